// A C++ QAT training loop with the torch::nn::Module pass of <qwix/nn.h>: a
// two-layer MLP whose Linear layers are qwix::nn::Linear (drop-in
// torch::nn::Linear), quantized by rules -- int4 weights per output channel,
// int8 activations per token -- and trained on a synthetic regression task.
// Prints the loss before and after, and fails (exit 1) when training does not lower it.
#include <qwix/nn.h>
#include <qwix/qwix.h>
#include <torch/torch.h>

#include <cstdio>

struct QatMlp : torch::nn::Module {
  qwix::nn::Linear fc1{nullptr}, fc2{nullptr};
  QatMlp() {
    fc1 = register_module("fc1", qwix::nn::Linear(32, 64));
    fc2 = register_module("fc2", qwix::nn::Linear(64, 1));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
};

int main() {
  torch::manual_seed(0);
  const auto x = torch::randn({256, 32});
  const auto y = (x.slice(1, 0, 4).sum(1, true) - x.slice(1, 4, 8).sum(1, true)).tanh();
  QatMlp net;
  qwix::QuantizationRule rule;
  rule.weight_qtype = "int4";
  rule.act_qtype = "int8";
  const auto provider = qwix::nn::quantize_model(net, qwix::QatProvider({rule}));
  torch::optim::Adam opt(net.parameters(), torch::optim::AdamOptions(1e-2));
  float first = 0.0f, last = 0.0f;
  for (int step = 0; step < 200; ++step) {
    opt.zero_grad();
    const auto loss = torch::mse_loss(net.forward(x), y);
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<float>();
    last = loss.item<float>();
  }
  std::printf("C++ QAT (int4 weights, int8 activations): loss %.4f -> %.4f, unused rules: %zu\n", first, last,
              provider->get_unused_rules().size());
  return last < 0.5f * first ? 0 : 1;
}
