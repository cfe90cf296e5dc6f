"""The policy of rl_examples/gpu_e2e.py: a Qwen2.5-7B-shaped decoder in plain torch.

QWEN25_7B has Qwen2.5-7B's width, depth, grouped-query attention heads, MLP width and
vocabulary; the weights are random (bf16 on a GPU, fp32 on the CPU): nothing is
downloaded, and what is measured -- the device time of generating and training -- does
not depend on the weights' values. TINY is a two-layer model of the same structure for
the CPU smoke mode. generate() decodes with a KV cache, batched over the environments;
train_step() runs the full forward pass and back-propagates into the last
`train_layers` layers, the final norm and the LM head (SGD): a last-layers update, not
a full 7B step. Both return once the device is done (synchronised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QWEN25_7B = {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4,
             "intermediate": 18944, "vocab": 152064, "rope_theta": 1e6}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
        "vocab": 512, "rope_theta": 1e4}


class Policy:
    """A Qwen2-style decoder (RMSNorm, RoPE, GQA attention with q/k/v biases, SwiGLU MLP,
    untied LM head) with random weights: generate() with a KV cache, train_step()."""

    def __init__(self, shape: dict, device: str, *, prompt: int, tokens: int,
                 train_layers: int, train_batch: int, lr: float = 1e-5, seed: int = 0):
        self.shape, self.prompt, self.tokens = shape, prompt, tokens
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.heads, self.kv_heads = shape["heads"], shape["kv_heads"]
        self.head_dim = shape["hidden"] // shape["heads"]
        torch.manual_seed(seed)
        kw = {"device": self.device, "dtype": self.dtype}
        d, hd, f = shape["hidden"], self.head_dim, shape["intermediate"]

        def layer() -> nn.ModuleDict:
            return nn.ModuleDict({
                "q": nn.Linear(d, self.heads * hd, bias=True, **kw),
                "k": nn.Linear(d, self.kv_heads * hd, bias=True, **kw),
                "v": nn.Linear(d, self.kv_heads * hd, bias=True, **kw),
                "o": nn.Linear(self.heads * hd, d, bias=False, **kw),
                "gate": nn.Linear(d, f, bias=False, **kw),
                "up": nn.Linear(d, f, bias=False, **kw),
                "down": nn.Linear(f, d, bias=False, **kw)})

        self.embed = nn.Embedding(shape["vocab"], d, **kw)
        self.layers = nn.ModuleList(layer() for _ in range(shape["layers"]))
        self.norms = [(torch.ones(d, **kw), torch.ones(d, **kw)) for _ in self.layers]
        self.final_norm = nn.Parameter(torch.ones(d, **kw))
        self.head = nn.Linear(d, shape["vocab"], bias=False, **kw)
        n_train = len(self.layers) if train_layers <= 0 else min(train_layers, len(self.layers))
        self.first_trained = len(self.layers) - n_train
        trained = [*self.layers[self.first_trained:].parameters(), self.final_norm,
                   *self.head.parameters()]
        for p in [*self.embed.parameters(), *self.layers.parameters()]:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        self.trained_params = sum(p.numel() for p in trained)
        self.params = (sum(p.numel() for p in self.embed.parameters())
                       + sum(p.numel() for p in self.layers.parameters())
                       + sum(p.numel() for p in self.head.parameters()) + d
                       + 2 * d * len(self.layers))
        self.opt = torch.optim.SGD(trained, lr=lr)
        self.train_batch = train_batch
        positions = torch.arange(prompt + tokens, device=self.device, dtype=torch.float32)
        inv = 1.0 / shape["rope_theta"] ** (torch.arange(0, hd, 2, device=self.device,
                                                         dtype=torch.float32) / hd)
        ang = torch.outer(positions, inv)
        ang = torch.cat([ang, ang], -1)
        self.cos, self.sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        self.rollouts = None  # [envs, prompt + tokens] of the last generation

    def name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _rope(self, x, pos: int):
        t = x.shape[2]
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _layer(self, i: int, x, pos: int = 0, cache=None):
        L = self.layers[i]
        b, t, d = x.shape
        ln1, ln2 = self.norms[i]
        h = F.rms_norm(x, (d,), ln1, 1e-6)
        q = L["q"](h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = L["k"](h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = L["v"](h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, pos), self._rope(k, pos)
        if cache is not None:
            kc, vc = cache
            kc[:, :, pos:pos + t] = k
            vc[:, :, pos:pos + t] = v
            k, v = kc[:, :, :pos + t], vc[:, :, :pos + t]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        x = x + L["o"](y.transpose(1, 2).reshape(b, t, d))
        h = F.rms_norm(x, (d,), ln2, 1e-6)
        return x + L["down"](F.silu(L["gate"](h)) * L["up"](h))

    def _logits(self, x):
        return self.head(F.rms_norm(x, (x.shape[-1],), self.final_norm, 1e-6))

    def _sample(self, logits):
        g = -torch.log(-torch.log(torch.rand_like(logits, dtype=torch.float32)
                                  .clamp_(1e-10, 1.0)))
        return (logits.float() + g).argmax(-1)  # Gumbel-max: a sample of softmax(logits)

    def encode(self, observations: list[bytes]):
        """Each env's observation as `prompt` token ids (its bytes, repeated)."""
        rows = []
        for obs in observations:
            b = list(obs) or [0]
            rows.append([b[j % len(b)] for j in range(self.prompt)])
        return torch.tensor(rows, device=self.device)

    def generate(self, observations: list[bytes]) -> list[list[int]]:
        with torch.no_grad():
            ids = self.encode(observations)
            b = ids.shape[0]
            caches = [(torch.empty(b, self.kv_heads, self.prompt + self.tokens,
                                   self.head_dim, device=self.device, dtype=self.dtype),
                       torch.empty(b, self.kv_heads, self.prompt + self.tokens,
                                   self.head_dim, device=self.device, dtype=self.dtype))
                      for _ in self.layers]
            x = self.embed(ids)
            for i in range(len(self.layers)):
                x = self._layer(i, x, 0, caches[i])
            nxt = self._sample(self._logits(x[:, -1]))
            out = [nxt]
            for step in range(self.tokens - 1):
                x = self.embed(nxt[:, None])
                for i in range(len(self.layers)):
                    x = self._layer(i, x, self.prompt + step, caches[i])
                nxt = self._sample(self._logits(x[:, -1]))
                out.append(nxt)
            new = torch.stack(out, 1)
            self.rollouts = torch.cat([ids, new], 1)
            actions = new.tolist()  # to the host: waits for the device
        self.sync()
        return actions

    def train_step(self) -> float:
        """Next-token loss on the last rollouts (train_batch of them): the frozen layers
        without autograd, the trained ones with it, one SGD step."""
        ids = self.rollouts[:self.train_batch]
        with torch.no_grad():
            x = self.embed(ids[:, :-1])
            for i in range(self.first_trained):
                x = self._layer(i, x)
        for i in range(self.first_trained, len(self.layers)):
            x = self._layer(i, x)
        logits = self._logits(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()
        self.sync()
        return value
