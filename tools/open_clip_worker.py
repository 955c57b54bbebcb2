"""open_clip's train step at a big_vlp two-tower's architecture, timed on request over pipes.

  PY tools/open_clip_worker.py --spec '<json>'   # build, warm up, then serve timing requests
  PY tools/open_clip_worker.py --check           # print the torch / open_clip versions

PY is the python of an environment holding torch and open_clip_torch (made by
tools/install_open_clip.sh); this file never imports jax or big_vlp. tools/benchmark.py starts
it once per architecture and interleaves its rounds with big_vlp's in one run.

Spec (one JSON object; fields marked * may be left out, every other one is required, and
an unknown field is an error):

  {"image_size": 224, "patch_size": 16,
   "image": {"width", "depth", "mlp_dim", "num_heads", "pool_type": "gap"|"map"|"tok"},
   "text": {"width", "depth", "mlp_dim", "num_heads", "context_length", "vocab_size",
            "pool_type": "last"|"first"|"gap"|"map", "causal"*: false},
   "embed_dim": 384, "batch": 32, "loss": "sigmoid"|"softmax",
   "optim": {"lr", "wd", "b1", "b2", "eps", "grad_clip_norm"*: float or null},
   "precision"*: "float32"|"bfloat16", "threads"*: null or int, "seed"*: 0, "compile"*: false}

Protocol. stdout carries only JSON lines (everything human-readable goes to stderr):
  1. after building and 2 warm-up steps:
       {"ready": true, "torch", "open_clip", "threads", "params", "build_s", "first_step_s"}
     (first_step_s includes torch.compile's work when "compile" is set). If building or
     warming up fails: {"ready": false, "error": "..."} and exit 1 (exit 2 for a bad spec).
  2. then per stdin line: {"steps": n} -> n timed steps, answered with
       {"step_s": [...], "loss": <last step's loss>, "max_rss_bytes": <peak RSS>};
     {"quit": true} or EOF -> exit 0. A malformed request is answered {"error": "..."}.

One step is what open_clip_train's train_one_epoch does per batch at accum_freq 1, minus
data loading (one synthetic batch is built once and reused, so the loss falls as the model
memorises it): zero_grad, forward (under torch.autocast(cpu, bfloat16) for "bfloat16", as
--precision amp_bf16), open_clip's ClipLoss / SigLipLoss, backward, clip_grad_norm_ (when
grad_clip_norm is set), AdamW step, logit_scale clamp to [0, ln 100].

Spec -> open_clip:
  model          open_clip.model.CLIP(embed_dim, CLIPVisionCfg, CLIPTextCfg); CustomTextCLIP
                 when text.pool_type is gap/map (its text tower is then wrapped, see below).
                 sigmoid: init_logit_scale=ln 10, init_logit_bias=-10 (open_clip's SigLIP
                 configs); softmax: open_clip's default scale ln(1/0.07), no bias. GELU is
                 torch's exact-erf nn.GELU (quick_gelu off) in both towers.
  image tower    CLIPVisionCfg(image_size, patch_size, width, layers=depth,
                 head_width=width // num_heads, mlp_ratio=mlp_dim / width, no_ln_pre=True,
                 pos_embed_type='learnable'), pooling:
                   gap -> pool_type='avg'; tok -> pool_type='tok';
                   map -> attentional_pool=True, attn_pooler_queries=1,
                          attn_pooler_heads=num_heads, pool_type='tok' (takes the 1 query).
  text tower     CLIPTextCfg(context_length, vocab_size, width, heads=num_heads,
                 layers=depth, mlp_ratio=mlp_dim / width, no_causal_mask=not causal,
                 pad_id=0, eos_id=vocab_size - 1, proj_bias=True), pooling:
                   last -> pool_type='argmax' (EOS = vocab_size - 1 is each row's largest id);
                   first -> pool_type='first';
                   gap / map -> open_clip's TextTransformer with pool_type='none',
                          proj_type='none' inside _PooledText: a mean over non-pad tokens,
                          or open_clip's AttentionalPooler (1 query, num_heads heads), then
                          nn.Linear(width, embed_dim).
  optimizer      torch.optim.AdamW(lr, betas=(b1, b2), eps) with open_clip main.py's groups:
                 no decay on params with ndim < 2 or named *bn* / *ln* / *bias* /
                 *logit_scale*, decay wd on the rest.
  batch          images N(0, 1) float32 [B, 3, H, W]; tokens int64 [B, context_length], row
                 i: n_i ~ U[1, context_length - 1] ids in [1, vocab_size - 2], then EOS,
                 then pad 0.

Differences from big_vlp's towers that remain (none changes the FLOPs materially):
  - open_clip's ViT always prepends a class token, so gap and map pooling run N + 1 tokens
    (big_vlp adds one only for 'tok'); 'avg' still averages the N patch tokens only.
  - No bias on the patch conv nor on the image projection (big_vlp: Conv and head Dense
    with bias). The text projection has one (proj_bias=True), as big_vlp's.
  - Image MAP: open_clip's AttentionalPooler LayerNorms the keys (ln_k, standing in for the
    encoder's final LN) and the query, attends at embed_dim wide (kdim = vdim = width), then
    ln_post and a [embed_dim, embed_dim] projection; big_vlp's MAPHead attends at width and
    adds LN + MLP(mlp_dim) on the one pooled token before its width -> embed_dim head. Per
    example that is one token's MLP against one small projection, next to N tokens x depth
    blocks.
  - Text: open_clip masks no padding keys (non-causal: full attention over the pads;
    causal: the causal mask only); big_vlp masks pad keys. Dense attention costs the same,
    but the kernels differ (big_vlp always passes a mask; open_clip passes none unless
    causal).
  - Text gap/map are not open_clip options: the wrapper above adds them. Its MAP masks no pad
    keys, uses the pooler's ln_k instead of the encoder's final LN, and has no MLP.
  - LayerNorm eps 1e-5 (torch) vs 1e-6 (flax); open_clip's init (normal / PyTorch defaults)
    vs big_vlp's (xavier_uniform / normal).
  - bfloat16: autocast picks which ops run in bf16 (matmuls, convs, SDPA) and keeps LN,
    softmax and the loss in float32; big_vlp computes activations in bf16 with LayerNorm
    statistics, attention softmax, pooling means and the loss in float32. Params stay
    float32 in both.
  - Weight decay: open_clip decays every >= 2-D param not named ln/bn/bias/logit_scale
    (embeddings and position embeddings included); big_vlp decays kernels only by default.
    Constant learning rate here (no schedule); logit_scale clamped each step, as open_clip.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from typing import Any, Callable, TextIO

import torch
from torch import nn

# Keep the Library alive for the process: dropping it would unregister the shim's ops.
_TORCHVISION_SHIM: Any = None
_REQUIRED = object()


class SpecError(ValueError):
  """A bad spec field; the message names it."""


def _import_torchvision() -> None:
  """Imports torchvision, defining nms/qnms first if its C ops did not load."""
  global _TORCHVISION_SHIM  # pylint: disable=global-statement
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
    return
  except RuntimeError as e:
    # PyPI's torchvision may be built for another torch (e.g. 0.28.0+cu130 next to
    # 2.13.0+cpu): its _C fails to load quietly and the Python-side registrations of nms
    # then raise. open_clip needs no torchvision op, so empty schemas are enough.
    if "torchvision::nms" not in str(e) and "torchvision::qnms" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
  _TORCHVISION_SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _TORCHVISION_SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  print("open_clip_worker: torchvision's C ops did not load; defined torchvision::nms/qnms "
        "schemas so it imports", file=sys.stderr)
  import torchvision  # pylint: disable=import-outside-toplevel,unused-import


def import_open_clip() -> Any:
  """Returns the open_clip module, importable even next to a mismatched torchvision."""
  _import_torchvision()
  import open_clip  # pylint: disable=import-outside-toplevel
  return open_clip


# ---------------------------------------------------------------------------------------
# Spec


def _field(d: dict[str, Any], key: str, prefix: str, kind: str, default: Any = _REQUIRED,
           choices: tuple[Any, ...] | None = None) -> Any:
  """d[key] checked as kind ('pos_int', 'int', 'num', 'pos_num', 'bool', 'choice')."""
  name = f"{prefix}{key}"
  if key not in d:
    if default is _REQUIRED:
      raise SpecError(f"{name}: missing")
    return default
  v = d[key]
  if v is None and default is None:
    return None
  is_int = isinstance(v, int) and not isinstance(v, bool)
  is_num = (is_int or isinstance(v, float)) and math.isfinite(v)
  bad = {"pos_int": not is_int or (is_int and v <= 0),
         "int": not is_int,
         "num": not is_num,
         "pos_num": not is_num or (is_num and v <= 0),
         "bool": not isinstance(v, bool),
         "choice": v not in (choices or ())}[kind]
  if bad:
    want = {"pos_int": "a positive integer", "int": "an integer", "num": "a finite number",
            "pos_num": "a positive number", "bool": "true or false",
            "choice": f"one of {list(choices or ())}"}[kind]
    raise SpecError(f"{name}: got {v!r}, expected {want}")
  return v


def _check_keys(d: Any, allowed: tuple[str, ...], prefix: str) -> dict[str, Any]:
  """d must be an object whose keys are all in allowed (typos would otherwise pass)."""
  if not isinstance(d, dict):
    raise SpecError(f"{prefix.rstrip('.') or 'spec'}: expected a JSON object, got {d!r}")
  for key in d:
    if key not in allowed:
      raise SpecError(f"{prefix}{key}: unknown field; allowed: {', '.join(allowed)}")
  return d


def _sub(d: dict[str, Any], key: str) -> Any:
  """A required sub-object of the spec."""
  if key not in d:
    raise SpecError(f"{key}: missing")
  return d[key]


def _tower(d: Any, prefix: str, extra: tuple[str, ...]) -> dict[str, Any]:
  """Checks a tower's width/depth/mlp_dim/num_heads; `extra` lists further allowed keys."""
  d = _check_keys(d, ("width", "depth", "mlp_dim", "num_heads", "pool_type") + extra, prefix)
  out = {k: _field(d, k, prefix, "pos_int") for k in ("width", "depth", "mlp_dim",
                                                      "num_heads")}
  if out["width"] % out["num_heads"]:
    raise SpecError(f"{prefix}num_heads: {out['num_heads']} does not divide "
                    f"{prefix}width={out['width']}")
  return out


def parse_spec(raw: Any) -> dict[str, Any]:
  """Validates the JSON spec and fills the optional fields' defaults."""
  raw = _check_keys(raw, ("image_size", "patch_size", "image", "text", "embed_dim", "batch",
                          "loss", "optim", "precision", "threads", "seed", "compile"), "")
  spec: dict[str, Any] = {
      "image_size": _field(raw, "image_size", "", "pos_int"),
      "patch_size": _field(raw, "patch_size", "", "pos_int"),
      "embed_dim": _field(raw, "embed_dim", "", "pos_int"),
      "batch": _field(raw, "batch", "", "pos_int"),
      "loss": _field(raw, "loss", "", "choice", choices=("sigmoid", "softmax")),
      "precision": _field(raw, "precision", "", "choice", "float32",
                          ("float32", "bfloat16")),
      "threads": _field(raw, "threads", "", "pos_int", None),
      "seed": _field(raw, "seed", "", "int", 0),
      "compile": _field(raw, "compile", "", "bool", False),
  }
  if spec["image_size"] % spec["patch_size"]:
    raise SpecError(f"patch_size: {spec['patch_size']} does not divide "
                    f"image_size={spec['image_size']}")

  image = _tower(_sub(raw, "image"), "image.", ())
  image["pool_type"] = _field(raw["image"], "pool_type", "image.", "choice",
                              choices=("gap", "map", "tok"))
  if image["pool_type"] == "map" and spec["embed_dim"] % image["num_heads"]:
    # open_clip's pooler attends at embed_dim wide with the tower's head count.
    raise SpecError(f"image.num_heads: {image['num_heads']} does not divide "
                    f"embed_dim={spec['embed_dim']} (needed by image.pool_type='map')")
  spec["image"] = image

  text = _tower(_sub(raw, "text"), "text.",
                ("context_length", "vocab_size", "causal"))
  for key in ("context_length", "vocab_size"):
    text[key] = _field(raw["text"], key, "text.", "pos_int")
  text["pool_type"] = _field(raw["text"], "pool_type", "text.", "choice",
                             choices=("last", "first", "gap", "map"))
  text["causal"] = _field(raw["text"], "causal", "text.", "bool", False)
  if text["context_length"] < 2:
    raise SpecError(f"text.context_length: {text['context_length']}, need >= 2 (a token "
                    "and EOS)")
  if text["vocab_size"] < 3:
    raise SpecError(f"text.vocab_size: {text['vocab_size']}, need >= 3 (pad 0, a token "
                    "id, EOS)")
  spec["text"] = text

  optim = _check_keys(_sub(raw, "optim"),
                      ("lr", "wd", "b1", "b2", "eps", "grad_clip_norm"), "optim.")
  spec["optim"] = {
      "lr": _field(optim, "lr", "optim.", "pos_num"),
      "wd": _field(optim, "wd", "optim.", "num"),
      "b1": _field(optim, "b1", "optim.", "num"),
      "b2": _field(optim, "b2", "optim.", "num"),
      "eps": _field(optim, "eps", "optim.", "pos_num"),
      "grad_clip_norm": _field(optim, "grad_clip_norm", "optim.", "pos_num", None),
  }
  for key in ("b1", "b2"):
    if not 0.0 <= spec["optim"][key] < 1.0:
      raise SpecError(f"optim.{key}: {spec['optim'][key]}, expected a number in [0, 1)")
  if spec["optim"]["wd"] < 0:
    raise SpecError(f"optim.wd: {spec['optim']['wd']}, expected >= 0")
  return spec


# ---------------------------------------------------------------------------------------
# Model, optimizer, batch, step


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """open_clip's mlp_ratio for a hidden size of exactly mlp_dim."""
  ratio = mlp_dim / width
  # open_clip sizes the MLP as int(width * mlp_ratio); float rounding can land one below.
  if int(width * ratio) != mlp_dim:
    ratio = (mlp_dim + 0.5) / width
  return ratio


class _PooledText(nn.Module):
  """open_clip's TextTransformer (pool 'none', no projection) + gap / map pooling + Linear."""

  def __init__(self, tower: nn.Module, pool_type: str, num_heads: int, embed_dim: int,
               pooler_cls: type) -> None:
    super().__init__()
    self.tower = tower
    self.pool_type = pool_type
    self.pad_id = tower.pad_id
    if pool_type == "map":
      # The pooler's ln_k normalises the tokens, as in open_clip's attentional image pool,
      # so the tower's own final LN would be a second one.
      tower.ln_final = nn.Identity()
      self.attn_pool = pooler_cls(tower.width, tower.width, n_head=num_heads, n_queries=1)
    self.proj = nn.Linear(tower.width, embed_dim)

  def forward(self, text: torch.Tensor) -> torch.Tensor:
    """text int [B, L] -> [B, embed_dim]."""
    x = self.tower(text)
    if self.pool_type == "gap":
      real = (text != self.pad_id).unsqueeze(-1).to(x.dtype)
      pooled = (x * real).sum(1) / real.sum(1).clamp_min(1.0)
    else:
      pooled = self.attn_pool(x)[:, 0]
    return self.proj(pooled)


def build_model(spec: dict[str, Any], open_clip: Any) -> nn.Module:
  """The two-tower model in open_clip's classes (see the module docstring's mapping)."""
  # open_clip (from import_open_clip) is passed in so torchvision's shim is already in place.
  CLIP, CustomTextCLIP = open_clip.model.CLIP, open_clip.model.CustomTextCLIP
  CLIPTextCfg, CLIPVisionCfg = open_clip.model.CLIPTextCfg, open_clip.model.CLIPVisionCfg
  img, txt = spec["image"], spec["text"]
  vision_cfg = CLIPVisionCfg(
      layers=img["depth"], width=img["width"], head_width=img["width"] // img["num_heads"],
      mlp_ratio=_mlp_ratio(img["width"], img["mlp_dim"]), patch_size=spec["patch_size"],
      image_size=spec["image_size"], no_ln_pre=True, pos_embed_type="learnable",
      # With the attentional pool, 'tok' takes its single query's output.
      pool_type={"gap": "avg", "tok": "tok", "map": "tok"}[img["pool_type"]],
      attentional_pool=img["pool_type"] == "map", attn_pooler_queries=1,
      attn_pooler_heads=img["num_heads"])
  wrap_text = txt["pool_type"] in ("gap", "map")
  text_cfg = CLIPTextCfg(
      context_length=txt["context_length"], vocab_size=txt["vocab_size"],
      width=txt["width"], heads=txt["num_heads"], layers=txt["depth"],
      mlp_ratio=_mlp_ratio(txt["width"], txt["mlp_dim"]), no_causal_mask=not txt["causal"],
      pad_id=0, eos_id=txt["vocab_size"] - 1,
      pool_type={"last": "argmax", "first": "first"}.get(txt["pool_type"], "none"),
      proj_type="none" if wrap_text else "linear", proj_bias=True)
  kwargs: dict[str, Any] = {"output_dict": True}  # As open_clip_train's create_model.
  if spec["loss"] == "sigmoid":
    kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
  if wrap_text:
    model = CustomTextCLIP(spec["embed_dim"], vision_cfg, text_cfg, **kwargs)
    model.text = _PooledText(model.text, txt["pool_type"], txt["num_heads"],
                             spec["embed_dim"], open_clip.transformer.AttentionalPooler)
  else:
    model = CLIP(spec["embed_dim"], vision_cfg, text_cfg, **kwargs)
  hidden = {m.mlp.c_fc.out_features for m in model.modules() if hasattr(m, "mlp")}
  want = {img["mlp_dim"], txt["mlp_dim"]}
  if hidden != want:
    raise RuntimeError(f"open_clip built MLP widths {sorted(hidden)}, spec asks {sorted(want)}")
  return model


def make_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
  """AdamW with open_clip main.py's weight-decay groups."""
  exclude = lambda n, p: (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                          or "logit_scale" in n)
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  return torch.optim.AdamW(
      [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
       {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": optim["wd"]}],
      lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"])


def make_batch(spec: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
  """One synthetic batch: images N(0, 1) [B, 3, H, W], tokens ids + EOS + pad 0 [B, L]."""
  gen = torch.Generator().manual_seed(seed)
  b, size = spec["batch"], spec["image_size"]
  length, vocab = spec["text"]["context_length"], spec["text"]["vocab_size"]
  images = torch.randn(b, 3, size, size, generator=gen)
  n_real = torch.randint(1, length, (b, 1), generator=gen)  # Leaves room for EOS.
  ids = torch.randint(1, vocab - 1, (b, length), generator=gen)
  pos = torch.arange(length)[None]
  tokens = torch.where(pos < n_real, ids, 0)
  tokens = torch.where(pos == n_real, vocab - 1, tokens)
  return images, tokens


def make_step(model: nn.Module, raw_model: nn.Module, spec: dict[str, Any],
              open_clip: Any) -> Callable[[], torch.Tensor]:
  """A closure running one train step on a fixed batch; returns the detached loss."""
  optimizer = make_optimizer(raw_model, spec["optim"])
  loss_fn = (open_clip.loss.SigLipLoss() if spec["loss"] == "sigmoid"
             else open_clip.loss.ClipLoss())
  images, tokens = make_batch(spec, spec["seed"])
  clip = spec["optim"]["grad_clip_norm"]
  bf16 = spec["precision"] == "bfloat16"
  max_log_scale = math.log(100)

  def step() -> torch.Tensor:
    """zero_grad, forward + loss (autocast), backward, clip, AdamW, clamp: as open_clip."""
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
      model_out = model(images, tokens)
      losses = loss_fn(**model_out, output_dict=True)
      total = sum(losses.values())
    total.backward()
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
      raw_model.logit_scale.clamp_(0, max_log_scale)
    return total.detach()

  return step


# ---------------------------------------------------------------------------------------
# Protocol


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
  """Writes one JSON line to the protocol stream."""
  out.write(json.dumps(obj) + "\n")
  out.flush()


def _protocol_stream() -> TextIO:
  """A private stream onto the real stdout; fd 1 itself is pointed at stderr."""
  # Libraries (and compiler subprocesses) that print to stdout would corrupt the JSON lines.
  sys.stdout.flush()
  out = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  return out


def _max_rss_bytes() -> int:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(step: Callable[[], torch.Tensor], inp: TextIO, out: TextIO) -> int:
  """Answers {"steps": n} lines until {"quit": true} or EOF."""
  while True:
    line = inp.readline()
    if not line:
      return 0
    line = line.strip()
    if not line:
      continue
    try:
      req = json.loads(line)
    except json.JSONDecodeError as e:
      _emit(out, {"error": f"request is not JSON ({e}): {line[:200]!r}"})
      continue
    if isinstance(req, dict) and req.get("quit") is True:
      return 0
    n = req.get("steps") if isinstance(req, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
      _emit(out, {"error": f"expected {{\"steps\": n > 0}} or {{\"quit\": true}}, got "
                           f"{line[:200]!r}"})
      continue
    times = []
    loss = torch.tensor(float("nan"))
    for _ in range(n):
      t0 = time.perf_counter()
      loss = step()
      times.append(time.perf_counter() - t0)
    _emit(out, {"step_s": times, "loss": float(loss), "max_rss_bytes": _max_rss_bytes()})


def main(argv: list[str] | None = None) -> int:
  """Parses the arguments, builds, warms up, then serves; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--spec", help="the architecture / step spec, one JSON object")
  group.add_argument("--check", action="store_true", help="print versions and exit")
  args = parser.parse_args(argv)
  out = _protocol_stream()

  if args.check:
    open_clip = import_open_clip()
    import torchvision  # pylint: disable=import-outside-toplevel
    _emit(out, {"torch": torch.__version__, "open_clip": open_clip.__version__,
                "torchvision": torchvision.__version__, "python": sys.version.split()[0]})
    return 0

  try:
    raw = json.loads(args.spec)
  except json.JSONDecodeError as e:
    raw = e
  try:
    if isinstance(raw, json.JSONDecodeError):
      raise SpecError(f"spec: not JSON ({raw})")
    spec = parse_spec(raw)
  except SpecError as e:
    print(f"open_clip_worker: bad spec field: {e}", file=sys.stderr)
    _emit(out, {"ready": False, "error": f"bad spec field: {e}"})
    return 2

  open_clip = import_open_clip()
  if spec["threads"] is not None:
    torch.set_num_threads(spec["threads"])
  t0 = time.perf_counter()
  try:
    torch.manual_seed(spec["seed"])
    raw_model = build_model(spec, open_clip)
    # As open_clip_train's --torchcompile: the optimizer and clamp use the original model.
    model = torch.compile(raw_model) if spec["compile"] else raw_model
    step = make_step(model, raw_model, spec, open_clip)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in raw_model.parameters())
    print(f"open_clip_worker: {type(raw_model).__name__}, {params:,} params, "
          f"{torch.get_num_threads()} threads, {spec['precision']}"
          f"{', compiled' if spec['compile'] else ''}; warming up", file=sys.stderr)
    t1 = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - t1
    step()
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    what = "torch.compile / warm-up" if spec["compile"] else "build / warm-up"
    _emit(out, {"ready": False, "error": f"{what} failed: {type(e).__name__}: {e}"[:4000]})
    return 1
  _emit(out, {"ready": True, "torch": torch.__version__, "open_clip": open_clip.__version__,
              "threads": torch.get_num_threads(), "params": params, "build_s": build_s,
              "first_step_s": first_step_s})
  return serve(step, sys.stdin, out)


if __name__ == "__main__":
  sys.exit(main())
