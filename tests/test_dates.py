"""Date conversion: the dataset, the three encoder-decoders, greedy and beam decoding, the command line."""

import datetime as dt
import json
import re

import pytest
import torch

from charrnn.cli import main
from charrnn.errors import CharRNNError
from charrnn.models.seq2seq import KINDS, Seq2Seq, Seq2SeqConfig
from charrnn.tasks import dates


def test_dataset_range_format_and_seed():
    inputs, targets = dates.dataset(3000, seed=[0, 1])
    assert (inputs, targets) == dates.dataset(3000, seed=[0, 1])
    assert dates.dataset(3000, seed=[0, 2])[0] != inputs
    pat = re.compile(r"^(%s) (\d{1,2}), (\d{4})$" % "|".join(dates.MONTHS))
    days = set()
    for i, t in zip(inputs, targets):
        m = pat.match(i)
        assert m, i
        d = dt.date.fromisoformat(t)
        assert dt.date(1000, 1, 1) <= d <= dt.date(9999, 12, 31)
        assert (dates.MONTHS[d.month - 1], int(m.group(2)), int(m.group(3))) == (m.group(1), d.day, d.year)
        days.add(m.group(2))
    assert {"2", "02"} <= days and "20" in days  # both ways of writing small days
    assert set("".join(inputs)) <= set(dates.INPUT_CHARS)
    assert dates.render(dt.date(2020, 5, 2)) == "May 2, 2020"
    assert dates.render(dt.date(2020, 5, 2), leading_zero=True) == "May 02, 2020"


def _model(kind, seed=0, hidden=32):
    torch.manual_seed(seed)
    iv, ov = dates.input_vocab(), dates.output_vocab()
    eos, sos = dates.ids_of(ov)
    net = Seq2Seq(Seq2SeqConfig(kind, len(iv), len(ov) + 2, eos, sos, 16, hidden)).eval()
    return dates.DateConverter(net, iv, ov)


@pytest.mark.parametrize("kind", KINDS)
def test_step_by_step_decoding_matches_the_training_forward(kind):
    conv = _model(kind)
    texts, targets = ["May 2, 2020", "September 20, 7075", "July 14, 1789"], ["2020-05-02", "7075-09-20", "1789-07-14"]
    from charrnn.tasks.common import pad_batch

    src, lengths = pad_batch(conv.in_vocab, texts)
    tin, tgt = dates.encode_targets(conv.out_vocab, targets)
    with torch.no_grad():
        full = torch.log_softmax(conv.model(src, lengths, tin), -1)
        ids, state = conv.model.start(src, lengths)
        for t in range(tgt.shape[1]):
            lp, state = conv.model.step(tin[:, t] if t else ids, state)
            assert torch.allclose(lp, full[:, t], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_of_any_length_decode_the_same_alone_or_in_a_batch(kind):
    conv = _model(kind, hidden=24)
    short = "May 2, 2020"
    alone = conv.greedy([short])[0]
    together = conv.greedy(["September 20, 7075", short, "May 02, 2020 "])[1]
    assert alone[0] == together[0] and alone[1] == pytest.approx(together[1], abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_width_one_is_greedy_beams_sorted_and_never_worse(kind):
    conv = _model(kind, seed=3)
    texts = dates.dataset(40, seed=[9, 9])[0]
    greedy = conv.greedy(texts)
    for (b,), g in zip(conv.beam(texts, 1), greedy):
        assert b[0] == g[0] and b[1] == pytest.approx(g[1], abs=1e-5)
    for hyps, g in zip(conv.beam(texts, 3), greedy):
        scores = [lp for _, lp in hyps]
        assert len(hyps) == 3 and scores == sorted(scores, reverse=True)
        assert scores[0] >= g[1] - 1e-6
        assert all(len(o) <= dates.MAX_OUTPUT and set(o) <= set(dates.OUTPUT_CHARS) for o, _ in hyps)


def test_out_of_alphabet_characters_are_named():
    conv = _model("attention")
    conv.greedy(["May 2, 2020", "May 02, 2020"])  # both accepted
    with pytest.raises(CharRNNError, match=r"'!'.*'/'.*'d'"):
        conv.greedy(["May 2nd, 2020!", "2020/05/02"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dates") / "run"
    cfg = dates.train(out, model="attention", train_size=12_000, val_size=500, epochs=3, log=lambda m: None)
    return out, cfg


@pytest.mark.slow
def test_attention_model_learns_to_convert(trained):
    out, cfg = trained
    assert cfg["result"]["val_accuracy"] > 0.97
    r = dates.evaluate(out, size=1000, seed=3, beam_width=3)
    assert r["greedy_accuracy"] > 0.97 and r["beam_accuracy"] > 0.97
    assert r["beam_worse_than_greedy"] == 0


@pytest.mark.slow
def test_cli_convert_eval_and_errors(trained, capsys, tmp_path):
    out, _ = trained
    assert main(["task", "dates", "convert", str(out), "July 14, 1789", "May 02, 2020", "May 2, 2020"]) == 0
    assert capsys.readouterr().out.splitlines() == ["1789-07-14", "2020-05-02", "2020-05-02"]
    assert main(["task", "dates", "convert", str(out), "May 2, 2020", "--beam-width", "3", "--json"]) == 0
    beams = json.loads(capsys.readouterr().out)["May 2, 2020"]
    assert len(beams) == 3 and beams[0]["output"] == "2020-05-02"
    assert main(["task", "dates", "eval", str(out), "--size", "200"]) == 0
    assert "greedy exact-match accuracy" in capsys.readouterr().out
    code = main(["task", "dates", "convert", str(out), "2020/05/02"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "'/'" in err and len(err.strip().splitlines()) == 1
    assert main(["task", "dates", "convert", str(out), "May 2, 2020", "--beam-width", "0"]) == 2
    assert "--beam-width" in capsys.readouterr().err
    png = tmp_path / "attn.png"
    code = main(["task", "dates", "convert", str(out), "May 2, 2020", "--plot-attention", str(png)])
    err = capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install" in err and not png.exists()
    else:
        assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
