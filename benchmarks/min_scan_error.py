"""The minGRU / minLSTM parallel scan under bf16 autocast against the step-by-step recurrence in fp32.

    python benchmarks/min_scan_error.py

For each cell (1 layer x 64, 4 random sequences of 1,000 steps), prints one JSON object: the mean and largest
relative error of the layer's output at steps 10, 100, 500 and 1,000, as the layer computes it now (the scan in
fp32 under autocast) and with the scan's sums run in bf16, as charrnn computed it before issue 31.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402

from charrnn.models.minrnn import MinRNN, _scan, step  # noqa: E402

STEPS, AT = 1000, (10, 100, 500, 1000)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    rel = (out.float() - ref).abs() / ref.abs()
    mean, most = rel.mean(dim=(0, 2)), rel.amax(dim=(0, 2))
    return {f"t{t}": {"mean_pct": round(100 * float(mean[t - 1]), 4), "max_pct": round(100 * float(most[t - 1]), 4)}
            for t in AT}


@torch.no_grad()
def main() -> None:
    for mode in ("mingru", "minlstm"):
        torch.manual_seed(0)
        rnn = MinRNN(mode, 32, 64)
        x = torch.randn(4, STEPS, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            now, _ = rnn(x)
            gi = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0)        # what the scan reads (bf16 under autocast)
            before = _scan(mode, gi, None)                              # the sums in bf16, as before issue 31
        h, ref = torch.zeros(4, 64), []
        for t in range(STEPS):
            h = step(mode, gi[:, t].float(), h)
            ref.append(h)
        ref = torch.stack(ref, 1)
        emit({"benchmark": "min_scan_error", "cell": mode, "now": errors(now, ref), "bf16_scan": errors(before, ref),
              **machine()})


if __name__ == "__main__":
    main()
