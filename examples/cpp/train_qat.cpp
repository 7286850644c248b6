// A C++ QAT training loop on the ops of <qwix/qwix.h>: a two-layer MLP whose
// weights are fake-quantized to int4 per output channel and whose activations
// to int8 per token, trained on a synthetic regression task. Prints the loss
// before and after, and fails (exit 1) when training does not lower it.
#include <qwix/qwix.h>
#include <torch/torch.h>

#include <cstdio>

struct QatMlp : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  QatMlp() {
    fc1 = register_module("fc1", torch::nn::Linear(32, 64));
    fc2 = register_module("fc2", torch::nn::Linear(64, 1));
  }
  torch::Tensor qlinear(torch::nn::Linear& l, const torch::Tensor& x) {
    const auto w = qwix::fake_quant(l->weight, "int4", {.channelwise_axes = {0}});
    const auto a = qwix::fake_quant(x, "int8", {.channelwise_axes = {0}});
    return torch::nn::functional::linear(a, w, l->bias);
  }
  torch::Tensor forward(const torch::Tensor& x) { return qlinear(fc2, torch::relu(qlinear(fc1, x))); }
};

int main() {
  torch::manual_seed(0);
  const auto x = torch::randn({256, 32});
  const auto y = (x.slice(1, 0, 4).sum(1, true) - x.slice(1, 4, 8).sum(1, true)).tanh();
  QatMlp net;
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
  std::printf("C++ QAT (int4 weights, int8 activations): loss %.4f -> %.4f\n", first, last);
  return last < 0.5f * first ? 0 : 1;
}
