"""The `spyglass` command line. Every subcommand's flags are generated from its config
dataclass (engine/config.py); `--config run.yaml` loads a file first, flags override it, and
each changes only what it names. A bad value prints one line `spyglass <cmd>: <key>: ...` and
exits 2. `build_parser(name)` / `parse_config(name, argv)` parse without running (tests).

    spyglass bench rollout                       # the main job: async engine vs lock-step, CPU
    spyglass rollout --out runs/r.jsonl --engine.n_samples 8 --timeline runs/t.png
    spyglass grpo --steps 3                      # fatal-aware GRPO on the tiny VLM, CPU
    spyglass sft ...   |   spyglass eval ...     # thin layers (see README)
    spyglass world --out /tmp/world              # generate the offline world
    spyglass launch --config examples/cluster.yaml   # servers + trainer ranks on a Ray cluster
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable

from spyglass.engine.config import ConfigError, ConfigParser, add_dataclass_args, config_from_args, read_config

# name -> (module, config class, run function, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "rollout": ("spyglass.engine.rollout", "RolloutConfig", "run_rollout",
                "roll out questions (--data FILE; default: the bundled world) into a JSONL of trajectories (resumable)"),
    "bench rollout": ("spyglass.engine.rollout", "RolloutConfig", "bench_rollout",
                      "the main job: async engine vs lock-step baseline on the same workload"),
    "grpo": ("spyglass.trainer.grpo", "GRPOConfig", "run_grpo",
             "fatal-aware GRPO: rollout -> reward -> advantage -> update -> sync -> eval"),
    "sft": ("spyglass.trainer.sft", "SFTConfig", "run_sft", "supervised fine-tuning on trajectories"),
    "eval": ("spyglass.trainer.eval", "EvalConfig", "run_eval", "evaluate a policy on benchmark files"),
    "serve": ("spyglass.engine.gateway", "GatewayConfig", "run_gateway",
              "OpenAI-compatible gateway in front of the policy; records every session as a trajectory"),
    "launch": ("spyglass.trainer.launch", "LaunchConfig", "run_launch",
               "a GRPO run on a Ray cluster: inference servers, then `spyglass grpo` ranks pointed at them"),
}
# commands with a hand-written argparse of their own: name -> (module, help)
PASSTHROUGH = {"world": ("spyglass.engine.offline.world", "generate the offline world (--out DIR --seed N)"),
               "synth": ("spyglass.trainer.synth.__main__", "OpenSearch-VL data synthesis (--world DIR --out DIR)")}


def _load(name: str) -> tuple[type, Callable[[Any], Any]]:
    mod_name, cfg_name, fn_name, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise SystemExit(f"spyglass {name}: not available in this build ({e})") from None
    return getattr(mod, cfg_name), getattr(mod, fn_name)


def _passthrough(name: str, argv: list[str]) -> int:
    mod = importlib.import_module(PASSTHROUGH[name][0])
    return mod.main(argv) or 0


def build_parser(name: str) -> tuple[argparse.ArgumentParser, type]:
    """The parser of command `name` (flags generated from its config class) and that class."""
    cfg_cls, _ = _load(name)
    ap = ConfigParser(prog=f"spyglass {name}", description=COMMANDS[name][3],
                      usage=f"spyglass {name} [-h] [--config FILE] [--section.field VALUE ...]")
    ap.add_argument("--config", metavar="FILE",
                    help="YAML/JSON file with (part of) the config; flags override it, the rest keeps the defaults")
    add_dataclass_args(ap, cfg_cls)
    return ap, cfg_cls


def _user_errors() -> tuple[type, ...]:
    """Errors that name a user's bad input (data records, plugin paths), not a bug."""
    from spyglass.engine.data import DataError  # noqa: PLC0415
    from spyglass.engine.plugins import PluginError  # noqa: PLC0415
    return (DataError, PluginError)


def parse_config(name: str, argv: list[str]) -> Any:
    """The config of command `name` from its flags: class defaults, then --config, then flags.
    A bad value raises ConfigError naming the key; a bad flag exits 2 (argparse)."""
    ap, cfg_cls = build_parser(name)
    ns = ap.parse_args(argv)
    return config_from_args(cfg_cls, ns, base=read_config(ns.config) if ns.config else None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if name not in COMMANDS:
        lines = "\n".join([f"  spyglass {k:<14} {v[3]}" for k, v in COMMANDS.items()]
                          + [f"  spyglass {k:<14} {v[1]}" for k, v in PASSTHROUGH.items()])
        print(f"usage: spyglass <command> [--config FILE] [--section.field VALUE ...] [--debug]\n\n{lines}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    rest = argv[len(name.split()):]
    debug = "--debug" in rest  # tracebacks are for bugs: --debug shows them for user errors too
    rest = [a for a in rest if a != "--debug"]
    try:
        cfg = parse_config(name, rest)
        out = _load(name)[1](cfg)
    except (ConfigError, FileNotFoundError) + _user_errors() as e:  # a bad value, file, model or record: one line
        if debug:
            raise
        print(f"spyglass {name}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that ended with its work on disk but failed (RolloutFailed, ...)
        if debug or type(e).__name__ not in ("RolloutFailed", "LaunchFailed"):
            raise
        print(f"spyglass {name}: {e}", file=sys.stderr)
        return 1
    if isinstance(out, dict) and name != "bench rollout":
        print(json.dumps(out, default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
