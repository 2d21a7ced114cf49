#!/usr/bin/env python3
"""Makes a TorchScript model for `shardctl split` (docs/models.md, "Bring your own model").

The model keeps its blocks in one ordered attribute, `blocks` (an nn.Sequential, or an
nn.ModuleList with --container modulelist), and its forward is exactly those blocks
applied in order. That is all `shardctl split` needs: it runs an example input through
the blocks, cuts them into shards and writes one encrypted package per shard.

    python3 examples/models/make_model.py --out /tmp/lm.pt
    python3 examples/models/make_model.py --out /tmp/lm.pt --train /var/tmp/shardguard-data/fortunes --steps 200

--arch gpt (default) is a byte-level causal transformer language model shaped like
shardd's zoo gpt: block 0 embeds token ids [t] (int64) into [t, h] with learned
positions, blocks 1..depth are pre-norm causal self-attention layers, the last block is
a layer norm and the LM head giving [t, vocab] logits. It reads the token files of
`shardctl data tokens` (spec.dataset.format: tokens). --arch mlp reads a Fashion-MNIST
image [1, 28, 28] and gives 10 logits (spec.dataset.format: fashion-mnist). --arch
classifier reads a float32 vector [--inputs] and gives --classes logits: tabular data
as .npy files (spec.dataset.format: tensors).

--variant makes the models that `split` must refuse (tests use them):
  sequence   the good model (default)
  dict       the blocks in an nn.ModuleDict: not an ordered sequence
  nochain    a block whose input width is not the previous block's output width
  outside    a parameter on the model itself, outside the blocks
  tied       the LM head reuses the embedding's token table (weights shared by two blocks)
  all        every one of them: --out is then a directory that gets <variant>.pt each

Needs Debian's python3-torch (1.13, the same version as libtorch-dev; `make deps`
installs it). Nothing here is imported by ShardGuard: it only writes the archive.
"""

import argparse
import math
import os
import sys

import torch
from torch import nn
import torch.nn.functional as F


class TokenEmbed(nn.Module):
    """Token ids [n, t] (int64) -> token vectors + learned positions [n, t, h]."""

    def __init__(self, vocab: int, context: int, hidden: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(vocab, hidden) * 0.02)
        self.pos = nn.Parameter(torch.randn(context, hidden) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.tokens) + self.pos[: ids.size(1)]


class CausalLayer(nn.Module):
    """Pre-norm causal transformer layer: x + proj(masked MHSA(LN(x))), x + MLP(LN(x))."""

    def __init__(self, hidden: int, heads: int, width: int = 0):
        super().__init__()
        width = width or hidden
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.size(0), x.size(1), self.proj.in_features
        dh = d // self.heads
        parts = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
        q, k, v = parts[0], parts[1], parts[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(dh)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(future, float("-inf")), -1)
        mixed = torch.matmul(att, v).permute(0, 2, 1, 3).reshape(n, t, d)
        x = x[..., :d] + self.proj(mixed)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LmHead(nn.Module):
    """Layer norm and a linear map to the vocabulary: [n, t, h] -> [n, t, vocab]."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x))


class TiedHead(nn.Module):
    """An LM head whose weight is the embedding's token table (weight tying)."""

    def __init__(self, embed: TokenEmbed, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.table = embed.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(x), self.table)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def gpt_blocks(a, variant):
    embed = TokenEmbed(a.vocab, a.context, a.hidden)
    blocks = [embed]
    for i in range(a.depth):
        # nochain: the second layer expects a wider input than the first one gives.
        width = a.hidden + 8 if (variant == "nochain" and i == 1) else 0
        blocks.append(CausalLayer(a.hidden, a.heads, width))
    blocks.append(TiedHead(embed, a.hidden) if variant == "tied" else LmHead(a.hidden, a.vocab))
    return blocks


def mlp_blocks(a, variant):
    if a.arch == "classifier":
        blocks = [nn.Sequential(nn.Linear(a.inputs, a.hidden), nn.ReLU())]
    else:
        blocks = [nn.Sequential(Flatten(), nn.Linear(28 * 28, a.hidden), nn.ReLU())]
    for i in range(a.depth - 1):
        width = a.hidden + 8 if (variant == "nochain" and i == 0) else a.hidden
        blocks.append(nn.Sequential(nn.Linear(width, a.hidden), nn.ReLU()))
    blocks.append(nn.Linear(a.hidden, a.classes if a.arch == "classifier" else 10))
    return blocks


class SequenceModel(nn.Module):
    """The model is its blocks, applied in order (nn.Sequential)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ListModel(nn.Module):
    """The same with an nn.ModuleList."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class DictModel(nn.Module):
    """Blocks in an nn.ModuleDict: named, but not an ordered sequence split can cut."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleDict({"b%d" % i: b for i, b in enumerate(blocks)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x


class OutsideModel(nn.Module):
    """A parameter of the model itself, outside the blocks: no shard could hold it."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) / self.temperature


def read_tokens(path):
    data = open(path, "rb").read()
    if len(data) % 2:
        sys.exit("%s: odd byte count, not uint16 tokens" % path)
    return torch.frombuffer(bytearray(data), dtype=torch.int16).to(torch.int64) & 0xFFFF


def train_lm(model, a):
    tokens = read_tokens(os.path.join(a.train, "train.tokens"))
    if int(tokens.max()) >= a.vocab:
        sys.exit("%s holds token %d, outside the vocabulary 0..%d" % (a.train, int(tokens.max()), a.vocab - 1))
    if tokens.numel() < a.context + 2:
        sys.exit("%s/train.tokens holds fewer than one window" % a.train)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    model.train()
    for step in range(a.steps):
        starts = torch.randint(0, tokens.numel() - a.context - 1, (a.batch,), generator=gen)
        windows = torch.stack([tokens[s : s + a.context + 1] for s in starts.tolist()])
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), windows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print("step %d loss %.4f (%.3f bits/token)" % (step + 1, loss.item(), loss.item() / math.log(2)))


VARIANTS = ["sequence", "dict", "nochain", "outside", "tied"]


def make(a, variant, out):
    torch.manual_seed(a.seed)
    blocks = gpt_blocks(a, variant) if a.arch == "gpt" else mlp_blocks(a, variant)
    if variant == "dict":
        model = DictModel(blocks)
    elif variant == "outside":
        model = OutsideModel(blocks)
    elif a.container == "modulelist":
        model = ListModel(blocks)
    else:
        model = SequenceModel(blocks)
    if a.train:
        if a.arch != "gpt":
            sys.exit("--train reads token files: only --arch gpt")
        train_lm(model, a)
    model.eval()
    scripted = torch.jit.script(model)
    tmp = out + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, out)
    params = sum(t.numel() for t in model.parameters())
    print("wrote %s: %s %s, %d blocks, %d parameters" % (out, a.arch, variant, len(blocks), params))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where the TorchScript archive goes")
    p.add_argument("--arch", choices=["gpt", "mlp", "classifier"], default="gpt")
    p.add_argument("--variant", choices=VARIANTS + ["all"], default="sequence")
    p.add_argument("--container", choices=["sequential", "modulelist"], default="sequential")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--inputs", type=int, default=12, help="--arch classifier: features per sample")
    p.add_argument("--classes", type=int, default=3, help="--arch classifier: classes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--train", help="a token dataset directory (train.tokens) to train on first (gpt)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.003)
    a = p.parse_args()
    if a.hidden % a.heads:
        sys.exit("--hidden %d is not divisible by --heads %d" % (a.hidden, a.heads))

    if a.variant == "all":
        os.makedirs(a.out, exist_ok=True)
        for v in VARIANTS:
            make(a, v, os.path.join(a.out, v + ".pt"))
    else:
        make(a, a.variant, a.out)


if __name__ == "__main__":
    main()
