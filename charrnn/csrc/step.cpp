// The sampling step (Step: a whole character's step through every layer and the output layer in one
// call) and the sampling draw (sample).  The same operations, in the same order, as the pure-PyTorch
// step in charrnn/sampling.py, so that both give the same bits.
#include "charrnn.h"

#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/record_function.h>

#include <limits>

namespace charrnn {

Trace::Trace(const char* name) {
  auto callbacks = at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION);
  if (!callbacks) return;   // no profiler: nothing to record
  guard_ = std::make_unique<at::RecordFunction>(std::move(*callbacks));
  if (guard_->isActive()) guard_->before(name);
}

Trace::~Trace() = default;

namespace {

// Row b of the input projection: a row of the table, or of a (B, G*H) tensor.
struct Rows {
  const float* base;
  std::vector<int64_t> offset;
  const float* operator[](int64_t b) const { return base + offset[b]; }
};

// The cells: the same operations, in the same order, as Stepper's Python cells (see charrnn/sampling.py);
// plain loops over rows (in parallel for large batches), ATen for the sigmoids.  tanh(a) is
// computed as 2 * sigmoid(2a) - 1 (doubling is exact): ATen's sigmoid is cheaper than its tanh.

Tensor gru_cell(const Rows& gi, const Tensor& h, const Tensor& gh, int64_t B, int64_t H) {
  Tensor rz = at::empty({B, 2 * H}, gh.options()), n = at::empty({B, H}, gh.options());
  Tensor hn = at::empty({B, H}, gh.options());
  float* const prz = rz.data_ptr<float>();
  float* const pn = n.data_ptr<float>();
  float* const phn = hn.data_ptr<float>();
  const float* const pgh = gh.data_ptr<float>();
  const float* const ph = h.data_ptr<float>();
  for_rows(B, H, [&](int64_t b) {   // rz = gi[:2H] + gh[:2H]
    const float* __restrict x = gi[b];
    const float* __restrict y = pgh + b * 3 * H;
    float* __restrict o = prz + b * 2 * H;
    for (int64_t j = 0; j < 2 * H; ++j) o[j] = x[j] + y[j];
  });
  at::sigmoid_(rz);
  for_rows(B, H, [&](int64_t b) {   // 2 * (r * gh_n + gi_n)
    const float* __restrict r = prz + b * 2 * H;
    const float* __restrict y = pgh + b * 3 * H + 2 * H;
    const float* __restrict x = gi[b] + 2 * H;
    float* __restrict o = pn + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float t = r[j] * y[j];
      const float u = t + x[j];
      o[j] = u * 2.f;
    }
  });
  at::sigmoid_(n);
  for_rows(B, H, [&](int64_t b) {   // n = 2 * sigmoid - 1;  h' = (h - n) * z + n
    const float* __restrict hp = ph + b * H;
    const float* __restrict sp = pn + b * H;
    const float* __restrict z = prz + b * 2 * H + H;
    float* __restrict o = phn + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float t = sp[j] * 2.f;
      const float nv = t - 1.f;
      const float d = hp[j] - nv;
      const float e = d * z[j];
      o[j] = e + nv;
    }
  });
  return hn;
}

std::pair<Tensor, Tensor> lstm_cell(const Rows& gi, const Tensor& c, const Tensor& gh, int64_t B, int64_t H) {
  Tensor g = at::empty({B, 4 * H}, gh.options()), cn = at::empty({B, H}, gh.options());
  Tensor tc = at::empty({B, H}, gh.options()), hn = at::empty({B, H}, gh.options());
  float* const pg = g.data_ptr<float>();
  float* const pc = cn.data_ptr<float>();
  float* const ptc = tc.data_ptr<float>();
  float* const phn = hn.data_ptr<float>();
  const float* const pgh = gh.data_ptr<float>();
  const float* const pc0 = c.data_ptr<float>();
  for_rows(B, H, [&](int64_t b) {   // [i, f, 2 g, o] = gi + gh, the g part doubled
    const float* __restrict x = gi[b];
    const float* __restrict y = pgh + b * 4 * H;
    float* __restrict o = pg + b * 4 * H;
    for (int64_t j = 0; j < 4 * H; ++j) o[j] = x[j] + y[j];
    for (int64_t j = 2 * H; j < 3 * H; ++j) o[j] = o[j] * 2.f;
  });
  at::sigmoid_(g);
  for_rows(B, H, [&](int64_t b) {   // g = 2 * sigmoid - 1;  c' = f * c + i * g;  2 c'
    const float* __restrict r = pg + b * 4 * H;
    const float* __restrict cp = pc0 + b * H;
    float* __restrict o = pc + b * H;
    float* __restrict t2 = ptc + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float t = r[2 * H + j] * 2.f;
      const float gv = t - 1.f;
      const float fc = r[H + j] * cp[j];
      const float ig = r[j] * gv;
      o[j] = fc + ig;
      t2[j] = o[j] * 2.f;
    }
  });
  at::sigmoid_(tc);
  for_rows(B, H, [&](int64_t b) {   // h' = o * (2 * sigmoid(2 c') - 1)
    const float* __restrict o4 = pg + b * 4 * H + 3 * H;
    const float* __restrict sp = ptc + b * H;
    float* __restrict o = phn + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float t = sp[j] * 2.f;
      const float tv = t - 1.f;
      o[j] = o4[j] * tv;
    }
  });
  return {hn, cn};
}

Tensor rnn_cell(const Rows& gi, const Tensor& gh, int64_t B, int64_t H) {
  Tensor hn = at::empty({B, H}, gh.options());
  float* const p = hn.data_ptr<float>();
  const float* const pgh = gh.data_ptr<float>();
  for_rows(B, H, [&](int64_t b) {   // 2 (gi + gh)
    const float* __restrict x = gi[b];
    const float* __restrict y = pgh + b * H;
    float* __restrict o = p + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float u = x[j] + y[j];
      o[j] = u * 2.f;
    }
  });
  at::sigmoid_(hn);
  for_rows(B, H, [&](int64_t b) {   // h' = 2 * sigmoid - 1
    float* __restrict o = p + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const float t = o[j] * 2.f;
      o[j] = t - 1.f;
    }
  });
  return hn;
}

}  // namespace

Step::Step(int64_t arch, int64_t hidden, Tensor table, std::vector<std::vector<Tensor>> ih,
           std::vector<std::vector<Tensor>> hh, std::vector<Tensor> head, int64_t vocab)
    : arch_(arch), H_(hidden), table_(table.contiguous()) {
  const int64_t G = arch == 0 ? 3 : arch == 1 ? 4 : 1;
  for (size_t i = 0; i < hh.size(); ++i) {
    hh_.push_back(make_linear(hh[i], G * hidden, hidden));
    ih_.push_back(i == 0 ? Linear() : make_linear(ih[i], G * hidden, hidden));
  }
  head_ = make_linear(head, vocab, hidden);
}

std::pair<Tensor, std::vector<Tensor>> Step::step(const Tensor& ids_in, const std::vector<Tensor>& state) const {
  const Trace trace("charrnn::step");
  const Tensor ids = ids_in.to(at::kLong).contiguous();
  TORCH_CHECK(ids.dim() == 1, "step: ids (batch,)");
  for (const Tensor& t : state)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == ids.size(0) && t.size(1) == H_,
                "step: the state must be float (batch, hidden) tensors");
  const int64_t B = ids.size(0), H = H_, G = table_.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t V = table_.size(0);
  std::vector<Tensor> out;
  Tensor x, gi_t;
  for (size_t layer = 0; layer < hh_.size(); ++layer) {
    Rows gi;
    if (layer == 0) {
      gi.base = table_.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(id[b] >= 0 && id[b] < V, "id out of range");
        gi.offset.push_back(id[b] * G);
      }
    } else {
      gi_t = ih_[layer](x);
      gi.base = gi_t.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) gi.offset.push_back(b * G);
    }
    if (arch_ == 0) {
      const Tensor h = state[layer].contiguous();
      x = gru_cell(gi, h, hh_[layer](h), B, H);
      out.push_back(x);
    } else if (arch_ == 1) {
      const Tensor h = state[2 * layer].contiguous(), c = state[2 * layer + 1].contiguous();
      auto hc = lstm_cell(gi, c, hh_[layer](h), B, H);
      x = hc.first;
      out.push_back(hc.first);
      out.push_back(hc.second);
    } else {
      const Tensor h = state[layer].contiguous();
      x = rnn_cell(gi, hh_[layer](h), B, H);
      out.push_back(x);
    }
  }
  return {head_(x), out};
}

// The next ids of rows of logits (B, V), as charrnn.decoding.choose does for a temperature > 0 without
// top-k / top-p / min-p, with the same operations: logits / T, [UNK] (id 0) -> -inf, softmax, cumsum,
// u ~ U[0, 1) drawn from the generator as torch.rand((rows, 1)), the first id whose cumulative
// probability exceeds u * total.  Groups of rows (rows starts[g] .. starts[g] + counts[g] - 1) each have
// their own generator and temperature, and draw exactly what sample() draws for them alone: softmax and
// cumsum work row by row.  ids[row] is written for the rows of the groups; the others are left alone.
void sample_rows(const Tensor& logits_in, const std::vector<c10::optional<at::Generator>>& gens,
                 const std::vector<double>& temperatures, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& counts, Tensor ids) {
  const Trace trace("charrnn::sample_rows");
  const Tensor logits = logits_in.contiguous();
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sample: float logits (B, V)");
  const int64_t B = logits.size(0), V = logits.size(1), G = static_cast<int64_t>(gens.size());
  TORCH_CHECK(static_cast<int64_t>(temperatures.size()) == G && static_cast<int64_t>(starts.size()) == G &&
                  static_cast<int64_t>(counts.size()) == G, "sample_rows: one temperature, start and count per generator");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == B && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "sample_rows: ids must be a contiguous int64 (B,) tensor");
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(starts[g] >= 0 && counts[g] > 0 && starts[g] + counts[g] <= B, "sample_rows: group rows out of range");
  Tensor x;
  if (G == 1 && starts[0] == 0 && counts[0] == B) {   // one generator for every row (charrnn generate)
    x = at::div(logits, temperatures[0]);
  } else {
    x = logits.clone();
    for (int64_t g = 0; g < G;) {   // one division per run of adjacent groups at one temperature
      int64_t end = g + 1;
      while (end < G && temperatures[end] == temperatures[g] && starts[end] == starts[end - 1] + counts[end - 1]) ++end;
      x.narrow(0, starts[g], starts[end - 1] + counts[end - 1] - starts[g]).div_(temperatures[g]);
      g = end;
    }
  }
  x.select(1, 0).fill_(-std::numeric_limits<float>::infinity());
  const Tensor cdf = at::softmax(x, -1).cumsum(-1);
  const float* c = cdf.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    const Tensor u = at::rand({counts[g], 1}, gens[g], logits.options());
    const float* pu = u.data_ptr<float>();
    for (int64_t i = 0; i < counts[g]; ++i) {
      const float* row = c + (starts[g] + i) * V;
      const float v = pu[i] * row[V - 1];
      out[starts[g] + i] = std::min<int64_t>(std::upper_bound(row, row + V, v) - row, V - 1);
    }
  }
}

// All rows from one generator at one temperature.
Tensor sample(const Tensor& logits, c10::optional<at::Generator> gen, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "sample: float logits (B, V)");
  Tensor ids = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) > 0) sample_rows(logits, {gen}, {temperature}, {0}, {logits.size(0)}, ids);
  return ids;
}

}  // namespace charrnn
