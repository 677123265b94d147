"""Tiny models shared by the tests, and a hypothesis strategy for random models."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

settings.register_profile("ci", deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """compile=True's native kernels built into the session's temporary folder, not the user's ~/.cache."""
    if "LAYERWISE_CACHE_DIR" not in os.environ:
        os.environ["LAYERWISE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))


@pytest.fixture
def unpackaged(monkeypatch, tmp_path):
    """As an install without the native kernels (no C compiler when setup.py ran): the default runs
    torch's kernels, and compile=True builds them into ``tmp_path``."""
    from layerwise import _native

    monkeypatch.setenv("LAYERWISE_CACHE_DIR", str(tmp_path))
    for name, value in (("_kernels", None), ("_packaged", False), ("_failed", None)):
        monkeypatch.setattr(_native, name, value)
    return tmp_path


class Interleaved(nn.Module):
    """The mission's interleaved model: lstm1 and linear train, lstm2 may be frozen in between."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.lstm1 = nn.LSTM(4, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.norm = nn.BatchNorm1d(hidden)
        self.linear = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(h)
        return self.linear(self.norm(h[:, -1]))


class TiedLM(nn.Module):
    """A language-model shape: the decoder's weight is the embedding's."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(torch.relu(self.body(self.embed(tokens)))))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TinyViT(nn.Module):
    """ViT-shaped toy: cls token and patch embedding, numbered blocks, final norm and head."""

    def __init__(self, dim: int = 8, depth: int = 4, classes: int = 3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU())
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture
def interleaved() -> Interleaved:
    torch.manual_seed(0)
    return Interleaved()


@pytest.fixture
def tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


@pytest.fixture
def vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT()


@pytest.fixture
def convbn() -> ConvBN:
    torch.manual_seed(0)
    return ConvBN()


@pytest.fixture
def siamese():
    from layerwise_demo import SiameseLSTM

    torch.manual_seed(0)
    return SiameseLSTM(hidden=5)


# --------------------------------------------------------------------------- random models

_NAMES = st.sampled_from(["enc", "dec", "head", "blocks", "attn", "mlp", "proj", "x"])


@st.composite
def random_models(draw, max_depth: int = 3) -> nn.Module:
    """A random tree of Linear / LayerNorm / Embedding leaves and ModuleList / ModuleDict nodes, some tied."""

    def node(depth: int) -> nn.Module:
        kind = draw(st.sampled_from(["linear", "norm", "embedding", "list", "dict"] if depth < max_depth else ["linear", "norm", "embedding"]))
        dim = draw(st.sampled_from([2, 3]))
        if kind == "linear":
            return nn.Linear(dim, dim, bias=draw(st.booleans()))
        if kind == "norm":
            return nn.LayerNorm(dim)
        if kind == "embedding":
            return nn.Embedding(4, dim)
        if kind == "list":
            return nn.ModuleList(node(depth + 1) for _ in range(draw(st.integers(1, 3))))
        names = draw(st.lists(_NAMES, min_size=1, max_size=3, unique=True))
        return nn.ModuleDict({n: node(depth + 1) for n in names})

    root = nn.ModuleDict({n: node(1) for n in draw(st.lists(_NAMES, min_size=1, max_size=3, unique=True))})
    params = list(root.named_parameters())
    if len(params) >= 2 and draw(st.booleans()):
        # Tie a random parameter to an earlier one of the same shape.
        target = draw(st.integers(1, len(params) - 1))
        for source in range(target):
            if params[source][1].shape == params[target][1].shape:
                owner, _, leaf = params[target][0].rpartition(".")
                setattr(root.get_submodule(owner), leaf, params[source][1])
                break
    return root


# --------------------------------------------------------------------------- several processes


def _rank_entry(rank: int, world_size: int, store: str, out: str, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def run_ranks(tmp_path):
    """``run_ranks(fn, *args, world_size=2)`` runs ``fn(rank, world_size, *args)`` in that many processes
    joined by a gloo process group on localhost, and returns each rank's return value (by rank).

    ``fn`` must be a module-level function of a test module (processes are spawned, not forked).
    """
    import torch.multiprocessing as mp

    def run(fn, *args, world_size: int = 2):
        store = tmp_path / f"store-{fn.__name__}"
        mp.start_processes(_rank_entry, args=(world_size, str(store), str(tmp_path), fn, args),
                           nprocs=world_size, start_method="spawn")
        return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

    return run


# --------------------------------------------------------------------------- timm conventions (timm cannot be imported here)


class TimmRuleScheduler:
    """timm.scheduler.Scheduler's update rule: each group's base value is its ``initial_lr`` (set from
    ``lr`` at construction), and ``lr = value * group["lr_scale"]`` when the group has one, applied at
    construction and at every step. ``factor(t)`` is the schedule (timm's cosine with lr_min=0)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor=lambda t: 0.5 ** t):
        self.optimizer, self.factor = optimizer, factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.step(0)

    def step(self, t: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_values):
            value = base * self.factor(t)
            group["lr"] = value * group["lr_scale"] if "lr_scale" in group else value


class TimmViT(nn.Module):
    """timm VisionTransformer's names and group_matcher; ``reg_in_matcher=False`` is timm #2712's version."""

    def __init__(self, dim: int = 4, depth: int = 3, reg_in_matcher: bool = True):
        super().__init__()
        self.reg_in_matcher = reg_in_matcher
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2)
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, 2)

    def group_matcher(self, coarse: bool = False) -> dict:
        stem = r"^cls_token|reg_token|pos_embed|patch_embed" if self.reg_in_matcher else r"^cls_token|pos_embed|patch_embed"
        return dict(stem=stem, blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_in_matcher else set())


class TimmBasicBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim)
        self.conv2, self.bn2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim)


class TimmResNet(nn.Module):
    """timm ResNet's names and group_matcher (note ``^conv1|bn1|maxpool``: re.match, so layer1.0.bn1 is a block)."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, dim, 3, bias=False), nn.BatchNorm2d(dim)
        for stage in (1, 2):
            setattr(self, f"layer{stage}", nn.Sequential(TimmBasicBlock(dim), TimmBasicBlock(dim)))
        self.fc = nn.Linear(dim, 2)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")


class TimmConvNeXt(nn.Module):
    """timm ConvNeXt's names and group_matcher: downsample shares its stage's first block, norm_pre joins the last."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2), nn.GroupNorm(1, dim))
        self.stages = nn.Sequential()
        for stage in range(2):
            s = nn.Module()
            s.downsample = nn.Identity() if stage == 0 else nn.Sequential(nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 1))
            s.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GroupNorm(1, dim)) for _ in range(2)))
            self.stages.append(s)
        self.norm_pre = nn.GroupNorm(1, dim)
        self.head = nn.Module()
        self.head.norm, self.head.fc = nn.LayerNorm(dim), nn.Linear(dim, 2)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm_pre", (99999,))])


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory):
    """Three tiny Llama folders (base, a, b) as `save_pretrained` writes them, with a tokenizer and a
    chat template built in code: vocabulary 32, width 16, 4 layers, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    tokenizer = _tiny_tokenizer()
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in ("base", "a", "b")}
