"""`mtakd trajectory`: how a student's layer trajectory compares with its teacher's, layer by layer
(MTA_SPEC §2–§7), teacher-forced on instruction–response pairs, without gradients.

Every student block l is compared with teacher block φ(l) = floor(l·N_T/N_S) (§2; a key layer with its own
teacher block uses that one). Per layer and per example:

- ``dsa_{word,phrase}_{importance,uniform}``: L_DSA (§6) at word and at phrase granularity (§3), with the
  importance weights ``mta.weights`` reads (§4–§5: the teacher's by default) and with uniform weights w = 1/N
  (the paper's "w/o weight" ablation);
- ``cka``: linear CKA (Kornblith et al. 2019) between the student's and the teacher's states over the response
  tokens; each example's value uses its own response tokens, ``pooled`` all response tokens of all examples
  (the per-example value is biased upwards when a response has fewer tokens than the hidden width:
  unrelated states score about d/(d+n), so plots and tables show the pooled one);
- ``hid``: L_Hid (§7) as the run optimised it: per token (``hid_level: token``) or per unit (``hid_level: unit``),
  weighted with the run's ``mta.weights`` (``uniform``: 1/N), with the trained projector W_l of the student's
  run where it saved one (``mta_projectors.safetensors`` in the student's directory or its parent run
  directory: key layers only), else with a least-squares W_l (min ‖H^S W − H^T‖² over the covered tokens, or
  units) cross-fitted: fitted on the examples of the other half (even / odd position in the data), so that a
  W with more parameters than fitted tokens cannot read 0 by fitting the scored tokens exactly.
  Covered tokens M_l: a key layer's own granularity's units, every unit (words and phrases) elsewhere.

Every value comes from the training loss's own functions (:mod:`mtakd.mta.functional`: ``importance_weights``,
``pool_spans``, ``dsa_per_sequence``, ``hid_per_sequence``), batched over examples and stacked over layers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, MTAConfig, ModelSource, RunConfig, add_config_command, load_config
from .mta.functional import dsa_per_sequence, hid_per_sequence, importance_weights, pool_spans
from .mta.layers import KeyLayer, phi, resolve_key_layers
from .mta.loss import _stack, token_weights
from .run import RUN_FILE

log = logging.getLogger(__name__)

GRANULARITIES = ("word", "phrase")
METRICS = {  # name -> label (plots, tables)
    "dsa_word_importance": "L_DSA word (importance w)",
    "dsa_word_uniform": "L_DSA word (uniform w)",
    "dsa_phrase_importance": "L_DSA phrase (importance w)",
    "dsa_phrase_uniform": "L_DSA phrase (uniform w)",
    "cka": "linear CKA (response tokens)",
    "hid": "L_Hid",
}
PROJECTOR_FILE = "mta_projectors.safetensors"
TRAINED, LEAST_SQUARES = "trained", "least_squares"


@dataclass(frozen=True)
class LayerPair:
    """Student block ``student`` compared with teacher block ``teacher``; ``key``: the key layer's granularity."""

    student: int
    teacher: int
    key: str | None = None


def layer_pairs(n_student: int, n_teacher: int, key_layers: list[KeyLayer] = ()) -> list[LayerPair]:
    """Every student block 1..N_S with φ(l) (MTA_SPEC §2), or the key layer's own teacher block."""
    keys = {k.student: k for k in key_layers}
    return [LayerPair(l, keys[l].teacher, keys[l].granularity) if l in keys else LayerPair(l, phi(l, n_student, n_teacher))
            for l in range(1, n_student + 1)]


# ------------------------------------------------------------------------------------ metrics
def cka_per_example(hs: torch.Tensor, ht: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Linear CKA ``[..., B]`` of each sequence over its ``tokens`` (``[B,T]`` bool), in float64:
    ⟨K, L⟩ / (‖K‖ ‖L‖) with K = X̄X̄ᵀ, L = ȲȲᵀ the Gram matrices of the centred states (= ‖X̄ᵀȲ‖² / (‖X̄ᵀX̄‖ ‖ȲᵀȲ‖)).
    NaN for a sequence with fewer than two such tokens."""
    r = tokens.to(torch.float64)[..., None]  # [B,T,1]
    n = r.sum(-2, keepdim=True).clamp_min(1)

    def gram(h):
        h = h.double() * r
        h = (h - h.sum(-2, keepdim=True) / n) * r
        return h @ h.transpose(-1, -2)

    k, l = gram(hs), gram(ht)
    den = ((k * k).sum((-1, -2)) * (l * l).sum((-1, -2))).sqrt()
    return torch.where(den > 0, (k * l).sum((-1, -2)) / den, torch.full_like(den, math.nan))


class Meter:
    """One student's metrics, accumulated batch by batch (:meth:`update`), then :meth:`result`.

    ``projectors``: trained W_l by student layer (``nn.Linear(d_S, d_T)``); the other layers get least-squares
    projectors fitted at the end on every example seen (their states are kept until then)."""

    def __init__(self, pairs: list[LayerPair], mta: MTAConfig, projectors: dict[int, nn.Module] | None = None):
        """The least-squares W_l are cross-fitted: examples at even positions in the data are scored with the W
        fitted on the odd ones and vice versa (one example only: fitted on itself, with a warning)."""
        self.pairs, self.mta = list(pairs), mta
        self.projectors = {p.student: projectors[p.student] for p in self.pairs if p.student in (projectors or {})}
        self.trained = [i for i, p in enumerate(self.pairs) if p.student in self.projectors]
        self.fitted = [i for i, p in enumerate(self.pairs) if p.student not in self.projectors]
        self.values: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}  # [L,B] per batch
        self.index: list[int] = []
        self.kept: list[tuple] = []  # least-squares layers: (H^S, H^T, w, M, fold) per batch
        self.sums: dict[str, torch.Tensor] = {}  # float64 sums: pooled CKA, normal equations per fold

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    @torch.no_grad()
    def update(self, student_hidden, teacher_hidden, batch: dict, index: list[int]) -> None:
        """One batch: HF ``hidden_states`` tuples of both models, the collated batch (with ``word_spans`` and
        ``phrase_spans``) and the examples' positions in the data."""
        cfg = self.mta
        missing = [g for g in GRANULARITIES if f"{g}_spans" not in batch]
        if missing:
            raise ValueError(f"trajectory: the batch lacks {missing} spans; build the examples with spans")
        mask = batch["attention_mask"].bool()
        response = mask & (batch["labels"] != -100)
        hs = _stack(student_hidden, [p.student for p in self.pairs])
        ht = _stack(teacher_hidden, [p.teacher for p in self.pairs]).to(hs.device)
        # ``uniform`` reads as the teacher's weights here: the uniform variant is measured on its own
        w, w_pool = token_weights(cfg, hs, ht, mask, weights="teacher" if cfg.weights == "uniform" else None)
        uniform = importance_weights(ht, mask, uniform=True)
        members = {g: batch[f"{g}_spans"].to(hs.device) for g in GRANULARITIES}
        for g, m in members.items():
            for name, (wt, ws) in (("importance", (w, w_pool)), ("uniform", (uniform, uniform))):
                units_t, span_w = pool_spans(ht, wt, m, aggregation=cfg.span_aggregation)
                units_s, _ = pool_spans(hs, ws, m, aggregation=cfg.span_aggregation)
                self.values[f"dsa_{g}_{name}"].append(
                    dsa_per_sequence(units_s, units_t, span_w, m.any(-1), distance=cfg.distance, pairs=cfg.pairs))
        self.values["cka"].append(cka_per_example(hs, ht, response))
        self._pool_cka(hs[:, response], ht[:, response])
        # L_Hid as the run optimised it: its own weights (``uniform`` too), per token or per unit
        if cfg.weights == "uniform":
            w, w_pool = token_weights(cfg, hs, ht, mask)
        xs, ys, wh, covered = self._hid_rows(hs, ht, w, w_pool, members)
        hid = torch.zeros(hs.shape[:2], dtype=hs.dtype, device=hs.device)
        for i in self.trained:  # one W_l per key layer, through its module's forward as in training
            proj = self.projectors[self.pairs[i].student]
            hid[i] = hid_per_sequence(proj(xs[i].to(proj.weight.dtype)).to(hs.dtype), ys[i], wh[i], covered[i])
        self.values["hid"].append(hid)
        if self.fitted:
            f = self.fitted
            fold = torch.tensor([i % 2 for i in index], device=hs.device)  # by position in the data: batching-free
            c = covered[f, ..., None].to(hs.dtype)
            for k in (0, 1):  # normal equations of each half over the covered rows only, in float64
                rows = covered[f].any(0) & (fold == k)[:, None]
                x, y = (xs[f] * c)[:, rows].double(), ys[f][:, rows].double()
                self._add(f"xtx{k}", x.mT @ x)
                self._add(f"xty{k}", x.mT @ y)
                self._add(f"rows{k}", covered[f][:, rows].sum(-1).double())  # [L_fit] covered rows per layer
            self.kept.append((xs[f], ys[f], wh[f], covered[f], fold))
        self.index += list(index)

    def _hid_rows(self, hs, ht, w, w_pool, members):
        """What L_Hid compares, ``(student [L,B,N,d_S], teacher [L,B,N,d_T], weights [L,B,N], covered [L,B,N])``:
        tokens with w (``hid_level: token``, MTA_SPEC §7), or units pooled as training pools them, with w^sp
        (``hid_level: unit``). M_l: the key layer's granularity, all units (words and phrases) elsewhere."""
        if self.mta.hid_level != "unit":
            cover = {g: m.any(-2) for g, m in members.items()}
            cover[None] = cover["word"] | cover["phrase"]
            return hs, ht, w, torch.stack([cover[p.key] for p in self.pairs])  # [L,B,T]
        spans = {**members, None: torch.cat([members["word"], members["phrase"]], dim=-2)}
        k = max(spans[p.key].shape[-2] for p in self.pairs)
        m = torch.stack([F.pad(spans[p.key], (0, 0, 0, k - spans[p.key].shape[-2])) for p in self.pairs])  # [L,B,K,T]
        units_t, span_w = pool_spans(ht, w, m, aggregation=self.mta.span_aggregation)
        units_s, _ = pool_spans(hs, w_pool, m, aggregation=self.mta.span_aggregation)
        return units_s, units_t, span_w, m.any(-1)

    def _pool_cka(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the response tokens ``[L,N,d]`` of a batch to the pooled (co)variances: per-batch centred float32
        products, merged in float64 with the batch means (Chan et al.'s parallel update)."""
        n = x.shape[1]
        if n == 0:
            return
        mx, my = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
        xc, yc = x - mx, y - my
        mx, my = mx.squeeze(1).double(), my.squeeze(1).double()
        batch = {"cxx": (xc.mT @ xc).double(), "cyy": (yc.mT @ yc).double(), "cxy": (xc.mT @ yc).double()}
        n0 = float(self.sums["n"]) if "n" in self.sums else 0.0
        if n0:
            dx, dy = mx - self.sums["mx"], my - self.sums["my"]
            f = n0 * n / (n0 + n)
            batch["cxx"] += f * dx[:, :, None] * dx[:, None, :]
            batch["cyy"] += f * dy[:, :, None] * dy[:, None, :]
            batch["cxy"] += f * dx[:, :, None] * dy[:, None, :]
            self.sums["mx"] = self.sums["mx"] + dx * n / (n0 + n)
            self.sums["my"] = self.sums["my"] + dy * n / (n0 + n)
        else:
            self.sums["mx"], self.sums["my"] = mx, my
        self.sums["n"] = torch.tensor(n0 + n, dtype=torch.float64)
        for k, v in batch.items():
            self._add(k, v)

    def least_squares(self, fold: int) -> torch.Tensor:
        """W ``[L_fit, d_S, d_T]`` minimising Σ_{t∈M_l} ‖H^S_t W − H^T_t‖² over the examples of ``fold`` (even /
        odd positions), from the normal equations (Cholesky; least squares when XᵀX is singular: fewer rows
        than the width, where the fit is not unique)."""
        xtx, xty = self.sums[f"xtx{fold}"], self.sums[f"xty{fold}"]
        chol, info = torch.linalg.cholesky_ex(xtx)
        if bool((info == 0).all()):
            return torch.cholesky_solve(xty, chol)
        return torch.linalg.lstsq(xtx, xty).solution

    def _cross_fitted(self) -> torch.Tensor:
        """The least-squares layers' L_Hid ``[L_fit, examples]`` (batch order), each example scored with the W
        fitted on the other half; a warning when a half has fewer covered tokens (units) than the width."""
        rows = [self.sums[f"rows{k}"] for k in (0, 1)]
        has = [float(r.max()) > 0 for r in rows]
        if has[0] != has[1]:
            log.warning("trajectory: least-squares L_Hid: only one half of the examples has covered tokens (one "
                        "example?), so it is fitted on the examples it scores (in-sample: it reads too low); "
                        "measure two or more examples")
        d = self.kept[0][0].shape[-1]
        folds = [k for k in (0, 1) if has[k]]
        if any(float(rows[k].min()) < d for k in folds):
            log.warning("trajectory: least-squares L_Hid: %s covered %s per half of the examples, fewer than the "
                        "student's width %d: the fit has more parameters than data and is noisy (it is scored "
                        "on the other half, so it cannot read 0 by fitting exactly); measure more --samples",
                        " / ".join(str(int(rows[k].min())) for k in folds),
                        "units" if self.mta.hid_level == "unit" else "tokens", d)
        source = {k: 1 - k if has[1 - k] else k for k in (0, 1)}  # the other half's W where it has data
        proj = {k: self.least_squares(source[k]).float()[:, None] for k in (0, 1)}
        out = []
        for xs, yt, wt, ct, fold in self.kept:
            by_fold = {k: hid_per_sequence(xs @ proj[k], yt, wt, ct) for k in {int(f) for f in fold}}
            out.append(torch.stack([by_fold[int(f)][:, b] for b, f in enumerate(fold)], dim=1))
        return torch.cat(out, dim=1)

    def result(self) -> list[dict]:
        """Per layer: ``student``, ``teacher``, ``key``, ``hid_projector`` and ``metrics`` {name: {mean,
        per_example}} with the examples in data order (and ``pooled`` for CKA)."""
        order = torch.argsort(torch.tensor(self.index))
        values = {m: torch.cat(v, dim=1)[:, order] for m, v in self.values.items()}
        if self.fitted:
            values["hid"][self.fitted] = self._cross_fitted()[:, order]
        s = self.sums
        if "n" in s:  # linear CKA of all response tokens: ‖C_xy‖² / (‖C_xx‖ ‖C_yy‖)
            den = s["cxx"].square().sum((-1, -2)).sqrt() * s["cyy"].square().sum((-1, -2)).sqrt()
            pooled = torch.where(den > 0, s["cxy"].square().sum((-1, -2)) / den, torch.full_like(den, math.nan))
        else:
            pooled = torch.full((len(self.pairs),), math.nan)
        out = []
        for i, p in enumerate(self.pairs):
            metrics = {m: {"mean": _float(v[i][~v[i].isnan()].mean()) if (~v[i].isnan()).any() else None,
                           "per_example": [_float(x) for x in v[i].tolist()]} for m, v in values.items()}
            metrics["cka"]["pooled"] = _float(pooled[i])
            out.append({**asdict(p), "hid_projector": TRAINED if i in self.trained else LEAST_SQUARES,
                        "metrics": metrics})
        return out


def hid_label(mta: dict) -> str:
    """What the ``hid`` column measured: the run's L_Hid level and weights (``result["mta"]``)."""
    level = mta.get("hid_level", "token")
    w = {"uniform": "uniform w", "student": "student's w"}.get(mta.get("weights"), "teacher's w")
    return f"L_Hid ({'per unit, w^sp' if level == 'unit' else 'per token'}, {w})"


def _float(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def hidden_states(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` of a causal LM (index l = output of block l), computing the logits of one position only."""
    device = next(model.parameters()).device
    kw = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
              output_hidden_states=True, use_cache=False)
    try:
        return model(**kw, logits_to_keep=1).hidden_states
    except TypeError:  # a model class without logits_to_keep
        return model(**kw).hidden_states


def measure(teacher, students: dict, examples: list, *, mta: MTAConfig, pairs: dict[str, list[LayerPair]],
            projectors: dict[str, dict[int, nn.Module]] | None = None, batch_size: int = 8, pad_token_id: int = 0,
            progress: bool = True) -> dict[str, list[dict]]:
    """{student name: :meth:`Meter.result`}: one teacher pass and one pass of each student per batch; batches are
    formed from examples of similar length (values are per example, so batching does not change them). Layers
    are stacked by equal (d_S, d_T) widths: one group for most models (OPT's project_out narrows the top state,
    see :func:`mtakd.mta.layers.hidden_widths`)."""
    from tqdm.auto import tqdm

    from .data import Collator, length_batches

    collate = Collator(pad_token_id)
    meters: dict[str, list[Meter]] = {}
    with torch.inference_mode(), tqdm(total=len(examples), desc="trajectory", unit="example",
                                      disable=not progress) as bar:
        for idx in length_batches([len(e.input_ids) for e in examples], batch_size):
            batch = collate([examples[i] for i in idx])
            t_hidden = hidden_states(teacher, batch)
            for name, student in students.items():
                s_hidden = hidden_states(student, batch)
                if name not in meters:
                    groups: dict[tuple[int, int], list[LayerPair]] = {}
                    for p in pairs[name]:
                        groups.setdefault((s_hidden[p.student].shape[-1], t_hidden[p.teacher].shape[-1]), []).append(p)
                    meters[name] = [Meter(g, mta, (projectors or {}).get(name)) for g in groups.values()]
                for meter in meters[name]:
                    meter.update(s_hidden, t_hidden, batch, idx)
            bar.update(len(idx))
        return {name: sorted((layer for m in ms for layer in m.result()), key=lambda layer: layer["student"])
                for name, ms in meters.items()}


# ------------------------------------------------------------------------------------ students
def parse_student(arg: str) -> tuple[str, ModelSource]:
    """``[NAME=]SOURCE`` → (name, source). SOURCE: a model directory or hub id, a ``.gguf`` file, or
    ``package:NAME`` (a package that ships the model)."""
    name, src = arg, arg
    if not Path(arg).exists() and "=" in arg:
        name, _, src = arg.partition("=")
        if not name or not src:
            raise ConfigError(f"--student {arg!r}: expected [NAME=]DIR_OR_SOURCE")
    if src.startswith("package:"):
        return name, ModelSource(package=src[len("package:"):])
    if src.endswith(".gguf") and Path(src).is_file():
        return name, ModelSource(gguf_file=str(Path(src).resolve()))
    return name, ModelSource(path=src)


def _run_dir(src: ModelSource) -> Path | None:
    """The student's directory or its parent run directory, whichever holds the run's projectors."""
    if not src.path or not Path(src.path).is_dir():
        return None
    d = Path(src.path)
    return next((p for p in (d, d.parent) if (p / PROJECTOR_FILE).is_file()), None)


def run_key_layers(src: ModelSource) -> list[KeyLayer] | None:
    """The key layers of the run that trained the student (``mtakd_run.json``: ``resolved.mta_key_layers``)."""
    if not src.path or not Path(src.path).is_dir():
        return None
    d = Path(src.path)
    for f in (d / RUN_FILE, d.parent / RUN_FILE):
        if f.is_file():
            keys = (json.loads(f.read_text()).get("resolved") or {}).get("mta_key_layers")
            return [KeyLayer(k["student"], k["teacher"], k["granularity"]) for k in keys] if isinstance(keys, list) else None
    return None


def trained_projectors(src: ModelSource, student, teacher, key_layers: list[KeyLayer]) -> dict[int, nn.Module]:
    """The run's trained W_l by student layer, from ``mta_projectors.safetensors`` (one ``i.weight`` [d_T, d_S]
    per key layer of the run, in its order); {} when the student's directory has none."""
    from safetensors.torch import load_file

    from .mta.layers import hidden_widths

    run = _run_dir(src)
    if run is None:
        return {}
    state = load_file(str(run / PROJECTOR_FILE))
    if len(state) != len(key_layers):
        raise ConfigError(f"{run / PROJECTOR_FILE}: {len(state)} projectors, but the run has {len(key_layers)} key "
                          f"layers ({[asdict(k) for k in key_layers]}; from {RUN_FILE})")
    d_s = hidden_widths(student, [k.student for k in key_layers])
    d_t = hidden_widths(teacher, [k.teacher for k in key_layers])
    out = {}
    for i, (k, a, b) in enumerate(zip(key_layers, d_s, d_t)):
        weight = state.get(f"{i}.weight")
        if weight is None or tuple(weight.shape) != (b, a):
            raise ConfigError(f"{run / PROJECTOR_FILE}: projector {i} of key layer {k.student}→{k.teacher} should be "
                              f"[{b}, {a}] (teacher × student width), got "
                              f"{None if weight is None else list(weight.shape)}")
        proj = nn.Linear(a, b, bias=False)
        proj.weight.data.copy_(weight.float())
        out[k.student] = proj.eval()
    return out


def _config_keys(cfg: RunConfig, n_s: int, n_t: int) -> list[KeyLayer]:
    if not cfg.objective.mta_enabled:
        return []
    try:
        return resolve_key_layers(cfg.objective.mta, n_s, n_t)
    except ConfigError as e:
        log.warning("no key layers marked for a %d-block student: %s", n_s, e)
        return []


# ------------------------------------------------------------------------------------ outputs
def key_layer_table(result: dict) -> str:
    """Markdown: one row per (student, key layer); CKA is the pooled value."""
    cols = list(METRICS)
    labels = {**METRICS, **result.get("metrics", {})}
    lines = ["| student | layer | " + " | ".join(labels[m].replace(" (response tokens)", "") for m in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for name, s in result["students"].items():
        for layer in s["layers"]:
            if layer["key"] is None:
                continue
            vals = [layer["metrics"][m]["pooled" if m == "cka" else "mean"] for m in cols]
            cells = ["—" if v is None else f"{v:.4f}" for v in vals]
            cells[-1] += " (trained W)" if layer["hid_projector"] == TRAINED else " (LS W, cross-fitted)"
            lines.append(f"| {name} | S{layer['student']}→T{layer['teacher']} {layer['key']} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        lines.append("| (no key layers: the config has no MTA key layers for these students) |" + " |" * len(cols))
    return "\n".join(lines) + "\n"


def plot_trajectory(result: dict, path: Path) -> Path:
    """One panel per metric, x = student layer, one line per student; key layers ringed (and, for L_Hid, a
    trained projector drawn as a filled square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(METRICS)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for c, (name, s) in enumerate(result["students"].items()):
            color = f"C{c}"
            xs = [layer["student"] for layer in s["layers"]]
            ys = [layer["metrics"][m]["pooled" if m == "cka" else "mean"] for layer in s["layers"]]
            ys = [math.nan if v is None else v for v in ys]
            ax.plot(xs, ys, "-o", color=color, ms=3, label=name)
            keys = [(x, y) for x, y, layer in zip(xs, ys, s["layers"]) if layer["key"]]
            if keys:
                ax.scatter(*zip(*keys), s=90, facecolors="none", edgecolors=color, linewidths=1.5)
            if m == "hid":
                trained = [(x, y) for x, y, layer in zip(xs, ys, s["layers"]) if layer["hid_projector"] == TRAINED]
                if trained:
                    ax.scatter(*zip(*trained), marker="s", s=40, color=color)
        title = {**METRICS, **result.get("metrics", {})}[m] + (" — pooled" if m == "cka" else "")
        if m == "hid":
            title += "\n■ trained W, else least-squares W (cross-fitted)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("student layer")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, title="○ key layer", title_fontsize=8)
    fig.suptitle(f"trajectory vs teacher ({result['examples']} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ command
def trajectory(cfg: RunConfig, student_args: list[str], *, data: str | None, samples: int, out: Path,
               initial: bool = False, batch_size: int = 8, progress: bool = True) -> dict:
    """Measure the config's initial student (with no ``student_args``, or with ``initial``) and each
    ``[NAME=]SOURCE`` against the config's teacher; write ``out/trajectory.json`` and ``out/trajectory.png``."""
    from .data import SpanSettings, build_examples, load_records
    from .run import build_models
    from .models import load_model, load_tokenizer, shared_vocabulary

    if samples < 1 or batch_size < 1:
        raise ConfigError(f"trajectory: --samples and --batch-size must be positive, got {samples} and {batch_size}")
    start = time.perf_counter()
    mta = cfg.objective.mta or MTAConfig()
    source = data or cfg.data.train[0]
    records = load_records(source)
    if len(records) < samples:
        log.warning("%s has %d usable records, fewer than --samples %d: using them all", source, len(records), samples)
    records = records[:samples]

    students, sources, keys = {}, {}, {}
    if initial or not student_args:
        teacher, students["initial"], tok = build_models(cfg)
        sources["initial"] = "student built from the config (as distill builds it)"
    else:
        tok, teacher = load_tokenizer(cfg.teacher), load_model(cfg.teacher)
    n_t = teacher.config.num_hidden_layers
    projectors = {}
    for arg in student_args:
        name, src = parse_student(arg)
        if name in students:
            raise ConfigError(f"--student {arg!r}: two students are named {name!r}; name them with NAME=SOURCE")
        model = load_model(src)
        shared_vocabulary(tok, load_tokenizer(src), teacher, model)
        students[name], sources[name] = model, src.describe()
        keys[name] = run_key_layers(src)
        if keys[name] is not None:
            projectors[name] = trained_projectors(src, model, teacher, keys[name])
    pairs = {}
    for name, model in students.items():
        model.eval()
        n_s = model.config.num_hidden_layers
        if keys.get(name) is None:
            keys[name] = _config_keys(cfg, n_s, n_t)
        pairs[name] = layer_pairs(n_s, n_t, keys[name])
    teacher.eval()

    examples = build_examples(records, tok, cfg.data, spans=SpanSettings.from_mta(mta), progress=progress)
    measured = time.perf_counter()
    layers = measure(teacher, students, examples, mta=mta, pairs=pairs, projectors=projectors,
                     batch_size=batch_size, pad_token_id=tok.pad_token_id or 0, progress=progress)
    result = {
        "teacher": cfg.teacher.describe(), "teacher_layers": n_t, "data": str(source), "examples": len(examples),
        "units": {g: {"total": sum(len(e.spans[g]) for e in examples),
                      "per_example": [len(e.spans[g]) for e in examples]} for g in GRANULARITIES},
        "response_tokens": [sum(1 for t in e.labels if t != -100) for e in examples],
        "mta": {k: getattr(mta, k) for k in ("weights", "hid_level", "center_states", "sigma", "distance", "pairs",
                                             "span_aggregation", "span_scope")},
        "metrics": {**METRICS, "hid": hid_label({"weights": mta.weights, "hid_level": mta.hid_level})},
        "students": {name: {"source": sources[name], "layers_total": students[name].config.num_hidden_layers,
                            "layer_map": {str(p.student): p.teacher for p in pairs[name]},
                            "key_layers": [asdict(k) for k in keys[name]], "layers": layers[name]}
                     for name in students},
        "time_s": {"total": 0.0, "measure": round(time.perf_counter() - measured, 2)},
    }
    out.mkdir(parents=True, exist_ok=True)
    result["time_s"]["total"] = round(time.perf_counter() - start, 2)
    (out / "trajectory.json").write_text(json.dumps(result, indent=1))
    plot_trajectory(result, out / "trajectory.png")
    return result


def _cmd_trajectory(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = trajectory(cfg, args.student or [], data=args.data, samples=args.samples, out=Path(args.out),
                        initial=args.initial, batch_size=args.batch_size)
    print(key_layer_table(result))
    print(f"{result['examples']} examples, {len(result['students'])} student(s): {result['time_s']['total']:.0f} s "
          f"({result['time_s']['measure']:.0f} s measuring); written to {args.out}/trajectory.json and trajectory.png")
    return 0


def add_parser(sub) -> None:
    p = add_config_command(
        sub, "trajectory", help="compare students' layers with the teacher's: L_DSA, CKA, L_Hid per layer",
        description="For every student layer l against teacher layer φ(l), teacher-forced on --samples examples of\n"
        "--data: L_DSA at word and phrase granularity with importance and uniform weights, linear CKA over\n"
        "response tokens, and L_Hid (the run's trained projectors where saved, least-squares ones otherwise).\n"
        "Teacher, template, spans and key layers come from the config. Writes DIR/trajectory.json and\n"
        "DIR/trajectory.png and prints the key layers (docs/trajectory.md).",
        config_help="run config (teacher, student, data, objective.mta)",
    )
    p.add_argument("--student", action="append", metavar="[NAME=]DIR_OR_SOURCE",
                   help="a student: model dir (e.g. a run's student/), hub id, .gguf file or package:NAME; repeat "
                   "to compare several (default: the config's initial student)")
    p.add_argument("--initial", action="store_true", help="also measure the config's initial student (named 'initial')")
    p.add_argument("--data", metavar="FILE.jsonl", help="instruction-response pairs (default: the config's first data.train)")
    p.add_argument("--samples", type=int, default=64, help="first N records of --data (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_cmd_trajectory)
