"""Pre-training parameters: one dataclass, loadable from YAML, every field overridable on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class PretrainParams:
    """Everything ``python -m training.pretrain`` needs. Units: learning rates per step; sizes in voxels."""

    data: str = field(default="synthetic:256", metadata={"help": (
        "training data: synthetic:N | manifest:PATH(.csv|.jsonl) | ctrate:VOLUMES_DIR,REPORTS_CSV[,METADATA_CSV[,LABELS_CSV]] "
        "| ctrg:REPORTS_JSON,VOLUMES_DIR | msd:DATASET_JSON")})
    val_data: str = field(default="", metadata={"help": "optional validation data, same syntax as --data"})
    preset: str = field(default="tiny", metadata={"help": "model preset: tiny | base | large"})
    input_size: list[int] | None = field(default=None, metadata={"model": "input_size", "help": "override the preset input size (z y x), multiples of 32"})
    text_encoder: str = field(default="", metadata={"model": "text_encoder", "help": "Hugging Face name or local path of the frozen text encoder (default: the preset's)"})
    objectives: list[str] | None = field(default=None, metadata={"model": "objectives", "help": "objectives to train (default: the paper's six, mim mlm sfr cml ssm dfa); add sva for sentence-volume alignment, which gives zero-shot scores and retrieval (not in the paper)"})
    lambdas: list[float] | None = field(default=None, metadata={"model": ("lambda_alpha", "lambda_beta", "lambda_gamma"), "help": "loss weights alpha beta gamma (default: 1.0 0.1 0.1)"})
    temperature: float | None = field(default=None, metadata={"model": "temperature", "help": "InfoNCE temperature (default: 0.07)"})
    window_size: int | None = field(default=None, metadata={"model": "window_size", "help": "Swin window size (default: the preset's)"})
    conv_stages: int | None = field(default=None, metadata={"model": "conv_stages", "help": "convolutional early encoder stages, 0-3 (0: the paper's Swin; default: the preset's, tiny 2, base and large 0)"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"model": "gradient_checkpointing", "help": "recompute Swin activations in backward (saves memory; default: off)"})
    max_steps: int = field(default=1000, metadata={"min": 1, "help": "optimizer steps to train"})
    batch_size: int = field(default=4, metadata={"min": 1, "help": "volumes per device per step (paper: 4)"})
    accumulate: int = field(default=1, metadata={"min": 1, "help": "gradient accumulation steps"})
    lr_vision: float = field(default=2e-5, metadata={"min": 0, "help": "learning rate of the vision encoder (paper: 2e-5)"})
    lr_fusion: float = field(default=1e-4, metadata={"min": 0, "help": "learning rate of fusion layers and heads (paper: 1e-4)"})
    weight_decay: float = field(default=0.01, metadata={"min": 0, "help": "AdamW weight decay (paper: 0.01)"})
    warmup_steps: int = field(default=100, metadata={"min": 0, "help": "linear warm-up steps, then cosine decay to 0"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "gradient norm clip (0: off)"})

    precision: str = field(default="32-true", metadata={"choices": PRECISIONS, "help": "Lightning precision: 32-true | bf16-mixed | 16-mixed"})
    accelerator: str = field(default="auto", metadata={"help": "cpu | gpu | auto"})
    devices: str = field(default="auto", metadata={"help": "devices per node: a count, a list like 0,1, or auto"})
    num_nodes: int = field(default=1, metadata={"min": 1, "help": "nodes (SLURM or torchrun provides the rendezvous)"})
    strategy: str = field(default="auto", metadata={"help": "Lightning strategy: auto | ddp | ddp_spawn | ..."})
    num_workers: int = field(default=2, metadata={"min": 0, "help": "data-loading worker processes per device"})
    cache_dir: str = field(default="", metadata={"help": "folder for the preprocessed-volume cache (empty: no cache)"})

    out_dir: str = field(default="runs/pretrain", metadata={"help": "where checkpoints, logs and the bundle go"})
    resume: str = field(default="", metadata={"help": "checkpoint to resume from, or 'last' for OUT_DIR/checkpoints/last.ckpt"})
    overwrite: bool = field(default=False, metadata={"help": "start a new run in an --out-dir that holds an earlier one, deleting its checkpoints and bundle"})
    init_from: str = field(default="", metadata={"help": (
        "continue pre-training from this bundle (its model, MIM decoder and MLM head) with a new optimiser and "
        "schedule, e.g. on new data or for another cycle; the architecture comes from the bundle")})
    stop_after_steps: int = field(default=0, metadata={"min": 0, "help": (
        "end this run after N more steps with a checkpoint, e.g. before a cluster time limit; continue with --resume last")})
    checkpoint_every: int = field(default=100, metadata={"min": 1, "help": "save last.ckpt every N steps"})
    val_every: int = field(default=0, metadata={"min": 0, "help": "validate every N steps (0: only with --val-data, at the end of each epoch)"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "log losses every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, masks, initialisation)"})
    synthetic_shape: list[int] = field(default_factory=lambda: [96, 128, 160], metadata={"help": "voxels of generated synthetic CTs"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainParams:
        """Parameters saved by a run (a checkpoint's hyper-parameters), leaving out removed options."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


RUN_ONLY_FIELDS = {"out_dir", "num_workers", "log_every", "checkpoint_every", "device", "devices", "progress", "resume"}


def made_with(bundle: str | Path, params) -> bool:
    """Whether ``bundle`` exists and was trained with exactly ``params`` (start bundle, data, steps, seed...),
    so a rerun can take it instead of training again. Where a run went and how it was executed do not count;
    a setting added after the bundle was written counts with the default it had then."""
    config = Path(bundle) / "config.json"
    if not config.is_file():
        return False
    done = json.loads(config.read_text()).get("provenance", {}).get("params", {})
    wanted = params.to_dict()
    defaults = type(params)().to_dict()
    return all(done.get(k, defaults[k]) == wanted[k] for k in set(wanted) - RUN_ONLY_FIELDS)


def validate_params(params) -> None:
    """Refuse impossible values (below a field's "min", outside its "choices"), naming the option."""
    for f in dataclasses.fields(params):
        value, low, choices = getattr(params, f.name), f.metadata.get("min"), f.metadata.get("choices")
        if low is not None and value is not None and value < low:
            raise SystemExit(f"{option_name(f.name)} {value}: must be at least {low}")
        if choices and value not in choices:
            raise SystemExit(f"{option_name(f.name)} {value!r}: choose one of {', '.join(choices)}")


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """A YAML value as the option's type (YAML reads 1e-4 as text); a value of another kind names the key."""
    hint = str(f.type).replace(" | None", "")

    def one(kind: str, v: Any) -> Any:
        if kind == "bool":
            if isinstance(v, bool):
                return v
        elif kind == "int":
            if not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
                return int(v)
        elif kind == "float":
            if not isinstance(v, bool):
                try:
                    return float(v)
                except (TypeError, ValueError):
                    pass
        elif kind == "str":
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                return str(v)
        raise SystemExit(f"{source}: {f.name}: {v!r} is not a valid {kind}; see --help for what it takes")

    if value is None:
        return None
    if hint.startswith("list["):
        if not isinstance(value, list):
            raise SystemExit(f"{source}: {f.name}: {value!r} is not a list; write it as [a, b, ...]")
        return [one(hint[5:-1], v) for v in value]
    return one(hint.split("[")[0], value)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (a file, a value, a bundle): one line, not a traceback."""
    from napari_mg3d.checkpoint import BundleError
    from napari_mg3d.model.text import TextEncoderUnavailable

    return (ValueError, OSError, BundleError, TextEncoderUnavailable)


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a training CLI: a user error prints ``error: ...`` in one line and exits 2; ``--debug`` shows
    the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main(argv)
    except user_errors() as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def option_name(field_name: str) -> str:
    """The command-line spelling of a parameter or model-config field: input_size -> --input-size."""
    return "--" + field_name.replace("_", "-")


def model_overrides(params) -> dict[str, Any]:
    """The model-config values a run sets: every field of ``params`` whose metadata names the MG3DConfig
    field(s) it sets ("model"), left out when not given (None or empty: the preset's, or the bundle's)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        target = f.metadata.get("model")
        value = getattr(params, f.name)
        if target is None or value is None or value == "" or value == []:
            continue
        if isinstance(target, tuple):
            if len(value) != len(target):
                raise SystemExit(f"--{f.name.replace('_', '-')} needs {len(target)} values "
                                 f"({' '.join(target)}), got {value}")
            out.update(zip(target, value))
        else:
            out[target] = tuple(value) if isinstance(value, list) else value
    return out


DDP_STRATEGIES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def resolve_strategy(name: str, ddp_strategy_class):
    """--strategy for Lightning (``ddp_strategy_class``: the Trainer's or Fabric's DDPStrategy). The DDP ones
    are built with ``find_unused_parameters``: an objective set without some objectives (the ablations) or
    a fine-tuning task that leaves the fusion layers out has parameters without a gradient, and DDP would
    otherwise stop at the next step."""
    if name not in DDP_STRATEGIES:
        return name
    return ddp_strategy_class(start_method=DDP_STRATEGIES[name], find_unused_parameters=True)


def parse_devices(text: str) -> str | int | list[int]:
    """--devices as Lightning takes it: 'auto', a count ('4') or a list of indices ('0,1')."""
    if text == "auto":
        return text
    try:
        return int(text) if text.isdigit() else [int(d) for d in text.split(",")]
    except ValueError:
        raise SystemExit(f"--devices {text!r}: give a count (4), a list of device indices (0,1) or auto") from None


def _arg_type(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    hint = str(f.type)
    if hint.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if "list[int]" in hint:
        return {"type": int, "nargs": "+"}
    if "list[float]" in hint:
        return {"type": float, "nargs": "+"}
    if "list[str]" in hint:
        return {"type": str, "nargs": "+"}
    for name, kind in (("float", float), ("int", int)):
        if hint.startswith(name):
            return {"type": kind}
    return {"type": type(default) if default is not None else str}


def build_parser(prog: str, description: str, params_cls=PretrainParams) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default="", help="YAML file with any of the options below")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--print-config", action="store_true",
                        help="print every option (defaults < --config < command line) as YAML and exit; edit it "
                             "and pass it back with --config")
    for f in dataclasses.fields(params_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "")
        if default is not None and "default:" not in text:
            text = f"{text} (default: {default})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=text, **_arg_type(f))
    return parser


def parse_params(argv: list[str] | None, prog: str, description: str, params_cls=PretrainParams):
    """Defaults < YAML (--config) < command line."""
    args = build_parser(prog, description, params_cls).parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(params_cls)}
        unknown = set(loaded) - names
        if unknown:
            raise SystemExit(f"{args.config}: unknown options {sorted(unknown)}; see --help")
        fields = {f.name: f for f in dataclasses.fields(params_cls)}
        values.update({k: _coerce(fields[k], v, args.config) for k, v in loaded.items()})
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "debug", "print_config")})
    params = params_cls(**values)
    validate_params(params)
    if args.print_config:
        print(yaml.safe_dump(params.to_dict(), sort_keys=False), end="")
        raise SystemExit(0)
    return params
