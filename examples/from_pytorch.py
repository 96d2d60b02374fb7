"""Move a PyTorch model's dilated convolution to dilconv and back.

Run: python examples/from_pytorch.py   (needs torch==2.13.0)
"""
import numpy as np
import torch

import dilconv

torch.manual_seed(0)
# An ASPP-like branch: 3x3 kernel, dilation 6, 'same'-size output with reflect padding.
module = torch.nn.Conv2d(16, 8, 3, padding=6, dilation=6, padding_mode="reflect")
layer = dilconv.Conv2d(16, 8, 3, padding=6, dilation=6, padding_mode="reflect")
print(module)
print(layer)

layer.load_state_dict(module.state_dict())          # tensors -> numpy arrays
x = np.random.default_rng(0).standard_normal((2, 16, 33, 33)).astype(np.float32)
y = layer(x)
y_torch = module(torch.from_numpy(x)).detach().numpy()
print("max |dilconv - torch| =", float(np.abs(y - y_torch).max()))
assert np.allclose(y, y_torch, rtol=1e-5, atol=1e-5)

# And back: numpy arrays -> tensors.
other = torch.nn.Conv2d(16, 8, 3, padding=6, dilation=6, padding_mode="reflect")
other.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
assert torch.equal(other.weight, module.weight)
