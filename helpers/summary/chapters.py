"""What each chapter stored, read the same way: its final models, their roles, controls and weights.

The summary reads other runs' results folders only. Each chapter stores its units its own way, so
this module holds one small declared entry per chapter (:data:`CHAPTERS`) and one reader per chapter
that turns a run's stored units into :class:`FinalUnit` rows: the models the chapter reports on
test, one per (method, dataset, seed), with

* ``role``: ``"RL"`` (an RL method), ``"control"`` (an equal-budget non-RL control that some method
  is judged against), ``"other"`` (a non-RL variant), ``"model"`` (the baselines' yardstick);
* the control(s) of each method, as the chapter declares them (:attr:`Chapter.controls`);
* a :class:`ModelSpec` that rebuilds the final model with :func:`helpers.models.create_model` from
  the run's stored ``params.yaml`` and the unit's keys, and the stored weights file(s) it needs
  (``weights_missing`` names the files that are not on disk and why);
* a :class:`DataSpec` that rebuilds the test images the unit scored, in the order of its stored
  ``test_index``, so its stored labels can be checked.

Per chapter (what is a method, what is the control, what is stored):

=============  ==========================================  ========================================
chapter        final units (method x dataset x seed)       control(s), as the chapter compares
=============  ==========================================  ========================================
baselines      ``flag, model, seed``                        none (a yardstick, not a method)
nas            champions (``champions/``): ``strategy,      rl, rl_faithful -> random;
               seed, arch``                                 rl_masked, rl_faithful_masked ->
                                                            random_masked; random_masked -> random
folds          ``fold=final``: the chosen config, one       none on test: before/after are compared
               seed, classification targets only            over folds on its page (no per-seed rows)
noise          ``stage=finetune``: ``method, seed`` on      policy -> plain, random; faithful,
               the mix (joint labels)                       random -> plain
apga           ``flag, size, k, method, seed``              apga, apga_faithful -> clean, cutout;
                                                            cutout, gradcam, end2end -> clean
ensemble       ``role=combiner``: ``combiner, expert,       every other combiner -> plain average
               seed``                                       (the chapter's control)
=============  ==========================================  ========================================
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..results import Recorder, read_json, unit_name

__all__ = ["Chapter", "CHAPTERS", "RunRef", "ModelSpec", "DataSpec", "FinalUnit", "final_units", "load_params",
           "DERIVED_DIR"]

#: The folder of a published run that holds the tables computed where its weights and scores were,
#: when it was published (:mod:`helpers.summary.derived`); read for its units whose weights or
#: scores are not on disk (:meth:`FinalUnit.published_rows`).
DERIVED_DIR = "derived"


@dataclass(frozen=True)
class Chapter:
    """The declared facts of one chapter: its title, RL methods and the control(s) of each method."""

    title: str
    rl: tuple[str, ...] = ()
    controls: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    note: str = ""
    #: each sound method and the variant that keeps the reference implementation's behaviour
    #: (``faithful``), trained at the same budget: their difference measures what our change does
    faithful: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: the (method, control) pairs that answer the chapter's question, for the introduction's table
    headline: tuple[tuple[str, str], ...] = ()

    def role(self, method: str) -> str:
        if method in self.rl:
            return "RL"
        if any(method in c for c in self.controls.values()):
            return "control"
        return "other"


ENSEMBLE_AVERAGE = "plain average"
CHAPTERS: dict[str, Chapter] = {
    "baselines": Chapter("Baselines", note="supervised models: the book's yardstick, with no RL method and no control"),
    "nas": Chapter("RL architecture search", rl=("rl", "rl_masked", "rl_faithful", "rl_faithful_masked"),
                   controls={"rl": ("random",), "rl_faithful": ("random",), "rl_masked": ("random_masked",),
                             "rl_faithful_masked": ("random_masked",), "random_masked": ("random",)},
                   faithful={"rl": ("rl_faithful",), "rl_masked": ("rl_faithful_masked",)},
                   headline=(("rl", "random"), ("rl_masked", "random_masked")),
                   note="each search's champion retrained once and tested once"),
    "folds": Chapter("Fold diagnostics", note="one final model per target (the chosen config, one seed), tested "
                     "once: no per-seed rows and no control on test; before vs after is paired over folds on its page"),
    "noise": Chapter("Policy-gradient noise masks", rl=("policy", "faithful"),
                     controls={"policy": ("plain", "random"), "faithful": ("plain",), "random": ("plain",)},
                     faithful={"policy": ("faithful",)}, headline=(("policy", "random"), ("policy", "plain")),
                     note="scored on the mix's joint labels (the chapter's per-dataset tables are on its page)"),
    "apga": Chapter("APGA", rl=("apga", "apga_faithful"),
                    controls={"apga": ("clean", "cutout"), "apga_faithful": ("clean", "cutout"),
                              "cutout": ("clean",), "gradcam": ("clean",), "end2end": ("clean",)},
                    faithful={"apga": ("apga_faithful",)}, headline=(("apga", "cutout"), ("apga", "clean"))),
    "ensemble": Chapter("RL-weighted ensemble", rl=("weighting, REINFORCE", "weighting, REINFORCE + expert gate"),
                        controls={m: (ENSEMBLE_AVERAGE,) for m in (
                            "stacker (logistic regression)", "weighting, CE", "weighting, faithful loss",
                            "weighting, REINFORCE", "plain average + expert gate",
                            "stacker (logistic regression) + expert gate", "weighting, CE + expert gate",
                            "weighting, faithful loss + expert gate", "weighting, REINFORCE + expert gate")},
                        faithful={"weighting, REINFORCE": ("weighting, faithful loss",),
                                  "weighting, REINFORCE + expert gate": ("weighting, faithful loss + expert gate",)},
                        headline=(("weighting, REINFORCE", ENSEMBLE_AVERAGE),),
                        note="combiners of cross-fitted members; the plain average and the weighting networks "
                             "are rebuilt from stored weights, the stacker and the expert's gate are not"),
}


@dataclass
class RunRef:
    """One stored run: its notebook, name, results folder and whether it is local or published."""

    notebook: str
    name: str
    root: Path
    source: str = "local"

    @property
    def params(self) -> dict:
        return load_params(self.root)

    @property
    def provenance(self) -> dict:
        path = self.root / "provenance.json"
        return read_json(path) if path.is_file() else {}


def load_params(root: Path) -> dict:
    """A run's stored resolved params (``params.yaml``), or ``{}``."""
    import yaml

    path = Path(root) / "params.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


@dataclass
class ModelSpec:
    """How to rebuild a final model: registry ``name``, classes, channels, kwargs, its weights file(s)
    and normalisation. Several files: the mean of their probabilities (an average of fold models);
    with ``groups`` (one member id per file) each member is the mean of its files, and ``combiner``
    (``{"weights": path, "hidden": int}``) rebuilds the ensemble chapter's weighting network
    (:class:`helpers.ensemble.combine.WeightNet`) that weights the members per image."""

    name: str
    num_classes: int
    in_chans: int
    kwargs: dict
    weights: list
    task: str
    mean: float = 0.5
    std: float = 0.5
    groups: list | None = None
    combiner: dict | None = None

    def missing(self) -> list[Path]:
        files = list(self.weights) + ([self.combiner["weights"]] if self.combiner else [])
        return [Path(w) for w in files if not Path(w).is_file()]

    def predictor(self, cache: dict | None = None) -> Callable:
        """``predict(images uint8 (N, C, H, W), key=None) -> probabilities (N, classes)`` of the rebuilt
        model. With a ``cache`` and a ``key`` naming the images, the members' probabilities are kept,
        so combiners of the same members (an average and weighting networks) score them once."""
        import torch

        from .robustness import predict_probs

        models = self.build()
        if self.groups is None:
            return lambda images, key=None: predict_probs(models, images, self.task, self.mean, self.std)
        members = list(dict.fromkeys(self.groups))
        by_member = [[m for m, g in zip(models, self.groups) if g == k] for k in members]
        net = None
        if self.combiner:
            from ..ensemble.combine import WeightNet, combine, to_logp

            net = WeightNet(len(members), self.num_classes, int(self.combiner.get("hidden", 64)))
            net.load_state_dict(torch.load(self.combiner["weights"], map_location="cpu", weights_only=True))
            net.eval()

        def predict(images, key=None):
            ident = (tuple(map(str, self.weights)), tuple(self.groups), key)
            if cache is not None and key is not None and ident in cache:
                stack = cache[ident]
            else:
                stack = np.stack([predict_probs(ms, images, self.task, self.mean, self.std) for ms in by_member])
                if cache is not None and key is not None:
                    cache[ident] = stack
            if net is None:
                return stack.mean(0)
            with torch.no_grad():
                x = to_logp(stack).transpose(0, 1).contiguous()
                return combine(x, net.mean_weights(x)).exp().numpy()
        return predict

    def build(self) -> list:
        """The model(s), weights loaded strictly (a state dict that does not fit raises), in eval mode."""
        import torch

        from ..models import create_model

        models = []
        for w in self.weights:
            m = create_model(self.name, num_classes=self.num_classes, in_chans=self.in_chans, **dict(self.kwargs))
            m.load_state_dict(torch.load(w, map_location="cpu", weights_only=True))
            models.append(m.eval())
        return models


@dataclass
class DataSpec:
    """The test images a unit scored: ``kind="medmnist"`` (``flags[0]`` at ``size``, converted to
    ``channels`` when given) or ``kind="mix"`` (the noise chapter's mix of ``flags``), taken at the
    unit's stored ``test_index`` positions."""

    kind: str
    flags: tuple
    size: int
    channels: int | None = None
    max_eval: int | None = None
    max_train: int | None = None

    @property
    def key(self) -> tuple:
        return (self.kind, self.flags, self.size, self.channels, self.max_eval)

    def test_split(self, data_root=None):
        """The whole test split of the spec (uint8 images, labels); positions are taken by the caller."""
        from .. import data as data_mod

        if self.kind == "mix":
            from ..noise.mix import build_mix

            mix = build_mix(list(self.flags), self.size, data_root, channels=self.channels or 3,
                            max_train=self.max_train, max_eval=self.max_eval)
            return mix["test"]
        ds = data_mod.load(self.flags[0], self.size, data_root, splits=("test",))
        split = ds["test"]
        if self.channels and self.channels != ds.n_channels:
            from ..noise.mix import _convert

            split = data_mod.Split(_convert(split.images, self.channels), split.labels, split.index)
        return split


@dataclass
class FinalUnit:
    """One final model of a chapter, as stored: see the module docstring."""

    chapter: str
    run: str
    source: str
    profile: str | None
    method: str
    dataset: str
    seed: int
    role: str
    metrics: dict
    keys: dict
    root: Path
    task: str
    model: ModelSpec | None = None
    data: DataSpec | None = None
    why_no_model: str = ""
    test_index: np.ndarray | None = None   # when the stored scores carry none (the ensemble's combiners)
    run_root: Path | None = None           # the run's results folder (``root`` may be a subfolder of it)

    @property
    def has_scores(self) -> bool:
        return (self.root / "scores" / f"{unit_name(**self.keys)}.npz").is_file()

    def scores(self) -> dict:
        """The unit's stored per-sample arrays (``test_scores``, ``test_labels``, ``test_index``, ...)."""
        return _ro(self.root).scores(**self.keys)

    @property
    def weights_missing(self) -> str:
        """Why this unit's final model cannot be rebuilt here (empty when it can)."""
        if self.source == "published" and (self.model is None or self.model.missing()):
            return "a published run keeps no weights (book/published holds small files only)"
        if self.model is None:
            return self.why_no_model or "the chapter stores no weights for this model"
        missing = self.model.missing()
        total = len(self.model.weights) + (1 if self.model.combiner else 0)
        if missing:
            return (f"{len(missing)} of {total} weights file(s) not stored (e.g. "
                    f"{missing[0].relative_to(self.root) if missing[0].is_relative_to(self.root) else missing[0]})")
        return ""

    def published_rows(self, table: str) -> pd.DataFrame:
        """This unit's rows of ``derived/<table>.csv`` (``calibration``, ``reliability`` or
        ``robustness``), computed when its run was published; empty for a local unit or without the file."""
        path = Path(self.run_root or self.root) / DERIVED_DIR / f"{table}.csv"
        if self.source != "published" or not path.is_file():
            return pd.DataFrame()
        df = _derived_csv(str(path), path.stat().st_mtime_ns)
        if not {"chapter", "method", "dataset", "seed"} <= set(df.columns):
            return pd.DataFrame()
        mine = (df["chapter"] == self.chapter) & (df["method"].astype(str) == self.method) & \
            (df["dataset"].astype(str) == str(self.dataset)) & (df["seed"] == self.seed)
        return df[mine].reset_index(drop=True)


@functools.lru_cache(maxsize=16)
def _derived_csv(path: str, mtime_ns: int) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _ro(root: Path) -> Recorder:
    """A recorder on an existing folder, made without creating anything."""
    rec = Recorder.__new__(Recorder)
    rec.root = Path(root)
    return rec


def _units(root: Path) -> list[dict]:
    return _ro(root).units()


def _info(flag: str) -> dict:
    from ..data import info

    return info(flag)


def _weights(root: Path, keys: Mapping[str, Any]) -> Path:
    return Path(root) / "models" / f"{unit_name(**keys)}.pt"


def _unit(run: RunRef, chapter: str, u: dict, root: Path, *, method: str, dataset: str, task: str,
          model: ModelSpec | None, data: DataSpec | None, why: str = "", test_index=None) -> FinalUnit:
    spec = CHAPTERS[chapter]
    return FinalUnit(chapter=chapter, run=run.name, source=run.source, profile=run.provenance.get("profile"),
                     method=method, dataset=dataset, seed=int(u["keys"].get("seed", 0)),
                     role="model" if chapter == "baselines" else spec.role(method), metrics=dict(u["metrics"]),
                     keys=dict(u["keys"]), root=root, task=task, model=model, data=data, why_no_model=why,
                     test_index=test_index, run_root=run.root)


# ---- one reader per chapter ------------------------------------------------------------------
def _baselines(run: RunRef) -> list[FinalUnit]:
    p, out = run.params, []
    size, kwargs = p.get("size", 28), p.get("model_kwargs") or {}
    for u in _units(run.root):
        k = u["keys"]
        meta = _info(k["flag"])
        model = ModelSpec(k["model"], len(meta["label"]), meta["n_channels"], dict(kwargs.get(k["model"]) or {}),
                          [_weights(run.root, k)], meta["task"])
        out.append(_unit(run, "baselines", u, run.root, method=k["model"], dataset=k["flag"], task=meta["task"],
                         model=model, data=DataSpec("medmnist", (k["flag"],), size)))
    return out


def _nas(run: RunRef) -> list[FinalUnit]:
    from ..nas.space import arch_from_key

    p, out = run.params, []
    flag, size = p.get("flag", "organamnist"), p.get("size", 28)
    meta = _info(flag)
    root = run.root / "champions"
    for u in _units(root):
        k = u["keys"]
        model = ModelSpec("nas_child", len(meta["label"]), meta["n_channels"],
                          {"arch": arch_from_key(k["arch"]), "image_size": size}, [_weights(root, k)], meta["task"])
        out.append(_unit(run, "nas", u, root, method=k["strategy"], dataset=flag, task=meta["task"], model=model,
                         data=DataSpec("medmnist", (flag,), size)))
    return out


def _folds(run: RunRef) -> list[FinalUnit]:
    p, out = run.params, []
    size, kwargs = p.get("size", 28), p.get("model_kwargs") or {}
    for u in _units(run.root):
        k = u["keys"]
        if k.get("fold") != "final" or not str(k.get("target", "")).endswith("-class"):
            continue   # fold units never touch test; regression finals have no class scores
        flag = str(k["target"])[: -len("-class")]
        meta = _info(flag)
        model = ModelSpec(p.get("model", "cnn"), len(meta["label"]), meta["n_channels"], dict(kwargs),
                          [_weights(run.root, k)], meta["task"])
        out.append(_unit(run, "folds", u, run.root, method=f"chosen config ({k['config']})", dataset=flag,
                         task=meta["task"], model=model, data=DataSpec("medmnist", (flag,), size)))
    return out


def _noise(run: RunRef) -> list[FinalUnit]:
    p, out = run.params, []
    per_ds = run.root / "tables" / "per_dataset.csv"
    flags = tuple(dict.fromkeys(pd.read_csv(per_ds)["dataset"])) if per_ds.is_file() else tuple(p.get("flags") or ())
    n_classes = sum(len(_info(f)["label"]) for f in flags)
    dataset = "mix (" + "+".join(f.replace("mnist", "") for f in flags) + ")"
    data = DataSpec("mix", flags, p.get("size", 28), p.get("channels", 3), p.get("max_eval"), p.get("max_train"))
    for u in _units(run.root):
        k = u["keys"]
        if k.get("stage") != "finetune":
            continue
        model = ModelSpec(p.get("model", "cnn"), n_classes, p.get("channels", 3), {}, [_weights(run.root, k)],
                          "multi-class")
        out.append(_unit(run, "noise", u, run.root, method=k["method"], dataset=dataset, task="multi-class",
                         model=model, data=data))
    return out


def _apga(run: RunRef) -> list[FinalUnit]:
    p, out = run.params, []
    kwargs = p.get("model_kwargs") or {}
    for u in _units(run.root):
        k = u["keys"]
        if k.get("method") in (None, "pretrain"):
            continue
        meta = _info(k["flag"])
        model = ModelSpec(p.get("model", "cnn"), len(meta["label"]), meta["n_channels"], dict(kwargs),
                          [_weights(run.root, k)], meta["task"])
        out.append(_unit(run, "apga", u, run.root, method=k["method"], dataset=f"{k['flag']} {k['size']} px, k={k['k']}",
                         task=meta["task"], model=model, data=DataSpec("medmnist", (k["flag"],), int(k["size"]))))
    return out


def _ensemble(run: RunRef) -> list[FinalUnit]:
    from ..ensemble.pipeline import GATED, LABELS

    p, out = run.params, []
    units = _units(run.root)
    if p.get("mura_root"):
        flag, meta = "MURA", {"label": {"0": "normal", "1": "abnormal"}, "n_channels": 3, "task": "binary-class"}
    else:
        flag = p.get("flag", "pneumoniamnist")
        meta = _info(flag)
    order = {}   # a combiner's rows follow the run's test split, i.e. its members' sorted test positions
    for u in units:
        k = u["keys"]
        scores = run.root / "scores" / f"{unit_name(**k)}.npz"
        if k.get("role") == "member" and k.get("seed") not in order and scores.is_file():
            with np.load(scores) as npz:
                order[k.get("seed")] = np.sort(npz["test_index"]) if "test_index" in npz.files else None
    for u in units:
        k = u["keys"]
        if k.get("role") != "combiner":
            continue
        model, why = None, ""
        if k.get("expert"):
            why = "the expert and its gate are not rebuilt here (the gate keeps no weights)"
        elif k["combiner"] == "stacker":
            why = "the stacker (scikit-learn) keeps no weights"
        else:   # plain average, or a weighting network stored with its unit
            members = sorted((m["keys"] for m in units if m["keys"].get("role") == "member"
                              and m["keys"].get("seed") == k["seed"]), key=lambda m: (m["member"], m["fold"]))
            model = ModelSpec(p.get("member_model", "seresnet_mura"), len(meta["label"]), meta["n_channels"],
                              dict(p.get("member_kwargs") or {}), [_weights(run.root, m) for m in members], meta["task"],
                              groups=[m["member"] for m in members],
                              combiner=None if k["combiner"] == "average" else
                              {"weights": _weights(run.root, k), "hidden": (p.get("combiner") or {}).get("hidden", 64)})
            if not members:
                model, why = None, "no member units stored for this seed"
        data = None if flag == "MURA" else DataSpec("medmnist", (flag,), p.get("size", 28))
        method = LABELS[k["combiner"]] + (GATED if k.get("expert") else "")
        out.append(_unit(run, "ensemble", u, run.root, method=method, dataset=flag, task=meta["task"], model=model,
                         data=data, why=why, test_index=order.get(k["seed"])))
    return out


READERS: dict[str, Callable[[RunRef], list[FinalUnit]]] = {
    "baselines": _baselines, "nas": _nas, "folds": _folds, "noise": _noise, "apga": _apga, "ensemble": _ensemble}


def final_units(runs: Sequence[RunRef]) -> list[FinalUnit]:
    """Every final model of ``runs`` (see the module docstring); a notebook without a reader is skipped."""
    out = []
    for run in runs:
        reader = READERS.get(run.notebook)
        if reader is not None and run.root.is_dir():
            out.extend(reader(run))
    return out
