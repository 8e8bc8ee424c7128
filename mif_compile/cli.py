"""``mif-compile`` / ``python -m mif_compile``: pattern search and plan tooling.

    mif-compile search --model PATH|tiny|random:layers=32,heads=32 [--text FILE] [--seq-len N] [--out plan.json]
                       [--modes fixed,mass [--masses 0.9,0.95,0.99,0.999] [--mass-caps 100,6096 ...]]
    mif-compile show PLAN.json [--plot OUT.png [--head L:H --model ... --seq-len N]]
    mif-compile convert IN.json OUT.json [--to minference|ours] [--drop-mass]
    mif-compile eval --model PATH|builtin [--lengths ...] [--config plan.json] ...   (mif_compile.evaluate)

``search`` captures each layer's q/k through the minference backend on one calibration prefill and
writes a per-layer, per-head plan with the recall of each choice (see ``mif_compile.search``); it
resumes from ``OUT.search/`` when interrupted. ``--modes fixed,mass`` also scores the adaptive index
(vertical-slash caps with mass targets); a head that picks one carries ``mass`` in our JSON, which
MInference's format cannot hold (``--minference-out`` / ``convert --to minference`` refuse such a plan
unless ``--drop-mass``). ``show`` prints a per-layer summary of a plan (ours or
MInference's JSON), ``--plot`` draws it, and ``--head`` also draws one head's attention map with the
kept blocks and columns over it (this needs the model and the calibration input again).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any, Callable

import torch

from .config import DEFAULT_MASS, ConfigError, ModelPlan, Pattern, load_plan, save_plan

_TINY = dict(layers=2, heads=4, kv_heads=2, hidden=64, intermediate=96, vocab=96)
_RANDOM = dict(layers=32, heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=1024, vocab=1024)


# ---------------------------------------------------------------------------------------------
# models and calibration input


def _random_spec(spec: str) -> dict[str, int]:
    """The sizes of ``tiny`` / ``random:key=value,...``, checked (errors name --model and the value)."""
    base = dict(_TINY) if spec == "tiny" else dict(_RANDOM)
    head, _, rest = spec.partition(":")
    if spec != "tiny" and head != "random":
        raise ConfigError(f"--model {spec!r}: expected tiny, random:key=value,... or a model folder")
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _RANDOM:
            raise ConfigError(f"--model {spec}: unknown key {key!r}; known: {sorted(_RANDOM)}")
        try:
            base[key] = int(value)
        except ValueError:
            raise ConfigError(f"--model {spec}: {key} must be an integer, got {value!r}") from None
        if base[key] < 1:
            raise ConfigError(f"--model {spec}: {key} must be positive, got {base[key]}")
    if base["hidden"] % base["heads"]:
        raise ConfigError(f"--model {spec}: hidden={base['hidden']} is not a multiple of heads={base['heads']}; "
                          f"give hidden=, e.g. hidden={base['heads'] * base.get('head_dim', 64)}")
    if base["heads"] % base["kv_heads"]:
        raise ConfigError(f"--model {spec}: heads={base['heads']} is not a multiple of kv_heads={base['kv_heads']}; "
                          "give kv_heads=, a divisor of heads")
    return base


def _random_llama(spec: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = _random_spec(spec)
    try:
        cfg = LlamaConfig(vocab_size=base["vocab"], hidden_size=base["hidden"], intermediate_size=base["intermediate"],
                          num_hidden_layers=base["layers"], num_attention_heads=base["heads"],
                          num_key_value_heads=base["kv_heads"], max_position_embeddings=1 << 20,
                          **({"head_dim": base["head_dim"]} if "head_dim" in base else {}))
    except (ValueError, TypeError) as e:  # transformers' own checks of the sizes
        raise ConfigError(f"--model {spec}: {_first_line(e)}") from None
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _first_line(e: BaseException) -> str:
    """An exception's message as one line (transformers' run to several)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def check_model_folder(spec: str, flag: str = "--model") -> None:
    """Models load from local folders only (no download): a clear error when ``spec`` is none."""
    if not os.path.isdir(spec):
        what = "is a file, not a folder" if os.path.exists(spec) else "does not exist"
        raise ConfigError(f"{flag} {spec!r}: the path {what}; models load from local folders (one written by "
                          "save_pretrained, with config.json and the weights), nothing is downloaded")


def load_model(spec: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer or None): ``tiny`` / ``random:key=value,...`` build a random Llama in code;
    anything else is a local model folder."""
    if spec in ("tiny", "random") or spec.startswith("random:"):
        return _random_llama(spec, device, dtype, seed), None
    check_model_folder(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {spec!r}: cannot load the model: {_first_line(e)}") from None
    model = model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def synthetic_text(n_pairs: int, seed: int = 0) -> str:
    """A key-value retrieval prompt like the InfiniteBench sample MInference calibrated on."""
    rng = random.Random(seed)
    uid = lambda: "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))  # noqa: E731
    pairs = [(uid(), uid()) for _ in range(n_pairs)]
    body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
    key = pairs[rng.randrange(n_pairs)][0] if pairs else ""
    return ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f"JSON data:\n{{{body}}}\n\nKey: \"{key}\"\nThe value associated with the specified key is: ")


def calibration_ids(model, tokenizer, seq_len: int, text_file: str | None, seed: int = 0) -> torch.Tensor:
    """[1, seq_len] token ids: the text file, or the synthetic prompt; repeated when too short."""
    vocab = model.config.vocab_size
    if text_file is not None:
        try:
            with open(text_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"--text {text_file!r}: cannot read it: {e.strerror}") from None
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        else:  # random models have no tokenizer: bytes modulo the vocabulary
            ids = [b % vocab for b in text.encode("utf-8")]
    elif tokenizer is not None:
        n_pairs = max(1, seq_len // 30)  # about 40 tokens per pair: usually long enough at once
        ids = tokenizer(synthetic_text(n_pairs, seed), add_special_tokens=True)["input_ids"]
        while len(ids) < seq_len:
            n_pairs *= 2
            ids = tokenizer(synthetic_text(n_pairs, seed), add_special_tokens=True)["input_ids"]
        tail = min(32, seq_len // 4)  # keep the question at the end
        ids = ids[: seq_len - tail] + ids[len(ids) - tail:]
    else:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (1, seq_len), generator=g)
    if not ids:
        raise ConfigError(f"{text_file}: the calibration text is empty")
    if len(ids) < seq_len:
        print(f"mif-compile: the calibration text has {len(ids)} tokens; repeated to {seq_len}", file=sys.stderr)
        ids = (ids * (seq_len // len(ids) + 1))
    return torch.tensor([ids[:seq_len]], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# argument parsing: every error is one line that names the flag and the value, exit code 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``mif-compile search: error: argument
    --seq-len: ...``, exit code 2. Also used by ``mif-compile eval``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def plain(doc: str | None) -> str:
    """A docstring's first paragraph as help text: no RST double backticks."""
    return (doc or "").split("\n\n")[0].replace("``", "").strip()


def number(kind: Callable[[str], Any], lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` within [lo, hi] (``lo_open``: (lo, hi]); the message names
    the value (argparse adds the flag)."""
    name = {int: "an integer", float: "a number"}[kind]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if low_bad or (hi is not None and value > hi):
            rng = (f"in {'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else
                   f"{'>' if lo_open else '>='} {lo}")
            raise argparse.ArgumentTypeError(f"expected {name} {rng}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def int_list(text: str) -> list[int]:
    """An argparse ``type`` for ``2048,4096``: positive integers separated by commas."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2048,4096, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``--modes fixed,mass``."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ("fixed", "mass") for m in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected fixed, mass or fixed,mass, got {text!r}")
    return modes


def _float_list(text: str) -> tuple[float, ...]:
    """An argparse ``type`` for mass targets ``0.9,0.95``: numbers in (0, 1]."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1] like 0.9,0.95, got {text!r}") from None
    if not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1], got {text!r}")
    return values


def _cap(text: str) -> tuple[int, int]:
    """An argparse ``type`` for a (v, s) cap ``100,6096``: two positive integers."""
    try:
        v, s = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cap V,S of two integers like 100,6096, got {text!r}") from None
    if v < 1 or s < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return v, s


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def run_command(prog: str, fn: Callable[[], Any], debug: bool, expected: tuple[type, ...] = ()) -> int:
    """Run ``fn``; an error is one line on stderr (``prog: error: ...``): exit code 2 for bad input
    (ConfigError, ``expected``, a file that cannot be read or written), 1 for anything else. With
    ``debug`` the exception propagates with its traceback."""
    try:
        fn()
    except (ConfigError, OSError, *expected) as e:
        if debug:
            raise
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (a bug or an environment problem: one line, --debug shows more)
        if debug:
            raise
        print(f"{prog}: error: {type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required,
                   help="a local model folder (Hugging Face, from save_pretrained; nothing is downloaded), 'tiny' "
                        "(2-layer random Llama) or 'random:layers=32,heads=32,kv_heads=8,head_dim=128,hidden=4096,"
                        "intermediate=1024,vocab=1024' (any of these keys)")
    p.add_argument("--text", help="calibration text file (default: a synthetic key-value retrieval prompt)")
    p.add_argument("--seq-len", type=number(int, 1), default=None,
                   help="calibration length (default 32768 on GPU, 4096 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    add_debug(p)


def _load_inputs(args):
    if args.text is not None and not os.path.isfile(args.text):  # before the model loads
        raise ConfigError(f"--text {args.text!r}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device!r}: this torch sees no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    n = args.seq_len or (32768 if args.device.startswith("cuda") else 4096)
    model, tok = load_model(args.model, args.device, dtype, args.seed)
    ids = calibration_ids(model, tok, n, args.text, args.seed).to(args.device)
    return model, ids


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_search(args) -> None:
    from .search import SearchSettings, parse_candidates, search

    kwargs: dict[str, Any] = dict(rule=args.rule, target=args.target, max_cost=args.max_cost, lam=args.lam,
                                  n_last=args.rows_last, n_spread=args.rows_spread, min_row=args.min_row,
                                  cost=args.cost, block_m=args.block_m, last_q=args.last_q, modes=args.modes)
    if args.masses is not None:
        kwargs["masses"] = args.masses
    if args.mass_caps is not None:
        kwargs["mass_caps"] = args.mass_caps
    if args.candidates:
        try:
            kwargs["candidates"] = parse_candidates(args.candidates)
        except ConfigError as e:
            raise ConfigError(f"--candidates: {e}") from None
    try:
        settings = SearchSettings(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e).replace("search: ", "", 1)) from None
    if args.minference_out and any(c.adaptive for c in settings.scored) and not args.drop_mass:
        raise ConfigError(f"--minference-out {args.minference_out!r}: MInference's format has no mass target, and "
                          f"--modes {','.join(settings.modes)} scores mass-targeted candidates; give --modes fixed "
                          "(MInference's mode only) or --drop-mass (those heads are written with their caps as "
                          "fixed budgets)")
    model, ids = _load_inputs(args)
    result = search(model, ids, settings=settings, out=args.out, state_dir=args.state, progress=not args.no_progress,
                    forward_kwargs={"use_cache": False, "logits_to_keep": 1}, inductor=args.inductor,
                    model_name=args.model)
    if result.resumed:
        print(f"resumed: layer(s) {result.resumed} read from {args.state or args.out + '.search'}")
    print(summary(result.plan))
    print(f"wrote {args.out}")
    if args.minference_out:
        save_plan(_drop_mass(result.plan, "search") if args.drop_mass else result.plan, args.minference_out,
                  minference_format=True)
        print(f"wrote {args.minference_out} (MInference format)")


def _drop_mass(plan: ModelPlan, cmd: str) -> ModelPlan:
    """``--drop-mass``: the plan without mass targets, said on stderr when there were any."""
    n = plan.count_mass()
    if n:
        print(f"mif-compile {cmd}: note: --drop-mass: the mass target of {n} head(s) is not written; in "
              "MInference's format they run their caps (v, s) as fixed budgets, which keep more keys",
              file=sys.stderr)
    return plan.without_mass()


def summary(plan: ModelPlan) -> str:
    """Per layer: pattern counts and, when the plan has them, mean and lowest recall (or, for a
    MInference file whose 4th field is a raw search score, that score, not called recall)."""
    if plan.layers is None:
        return plan.summary()
    name = plan.score_name()
    lines = []
    for line, layer in zip(plan.summary().splitlines(), plan.layers):
        scores = [hp.score for hp in layer if hp.score is not None]
        if scores:
            fmt = "{:.3f}" if name == "recall" else "{:.6g}"
            line += f"  | {name} mean {fmt.format(sum(scores) / len(scores))} min {fmt.format(min(scores))}"
        lines.append(line)
    counts: dict[str, int] = {}
    for layer in plan.layers:
        for hp in layer:
            counts[hp.pattern.value] = counts.get(hp.pattern.value, 0) + 1
    total = sum(counts.values())
    lines.append(f"{len(plan.layers)} layers, {total} heads: "
                 + ", ".join(f"{p} {n} ({100 * n / total:.0f}%)" for p, n in sorted(counts.items())))
    lines.append(mass_line(plan))
    if name == "score":
        lines.append("score: the 4th field of the heads, not a recall (some values are outside [0, 1]; MInference's "
                     "files hold raw search scores for some models)")
    return "\n".join(lines)


def mass_line(plan: ModelPlan) -> str:
    """How many vertical-slash heads use the adaptive index (a mass target) and which targets."""
    heads = [hp for layer in plan.layers for hp in layer] if plan.layers is not None else [plan.default]
    vs = [hp for hp in heads if hp.pattern is Pattern.VERTICAL_SLASH]
    targets: dict[float, int] = {}
    for hp in vs:
        if hp.adaptive:
            targets[hp.mass] = targets.get(hp.mass, 0) + 1
    n = sum(targets.values())
    fixed = sum(hp.fixed for hp in vs)
    inherit = len(vs) - n - fixed
    parts = [f"{n} of {len(vs)} vertical-slash heads ("
             + ", ".join(f"mass={m:g} x{c}" for m, c in sorted(targets.items())) + ")" if n
             else f"none of {len(vs)} vertical-slash heads"]
    if fixed:
        parts.append(f"{fixed} fixed budgets")
    if inherit:
        parts.append(f"{inherit} take the backend's mass setting (default {DEFAULT_MASS}, the adaptive index)")
    return "adaptive index (mass target): " + ", ".join(parts)


def _parse_head(s: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in s.split(":"))
    except ValueError:
        raise ConfigError(f"--head must be LAYER:HEAD, like 3:17, got {s!r}") from None
    return layer, head


def _cmd_show(args) -> None:
    plan = load_plan(args.plan)
    print(summary(plan))
    if args.plot is None:
        if args.head is not None:
            raise ConfigError("--head draws into --plot's file: give --plot OUT.png too")
        return
    from .plot import plot_head, plot_plan

    if args.head is None:
        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}")
        return
    layer, head = _parse_head(args.head)
    if args.model is None:
        raise ConfigError("--head needs --model (and the calibration options) to compute the attention map")
    if plan.layers is not None and not (0 <= layer < len(plan.layers) and 0 <= head < len(plan.layers[layer])):
        raise ConfigError(f"--head {args.head}: the plan has no layer {layer}, head {head}")
    hp = plan.layers[layer][head] if plan.layers is not None else plan.default
    from .search import capture_backend, capture_qk, model_counts

    model, ids = _load_inputs(args)
    try:
        plan.check_model(model)
    except ConfigError as e:
        raise ConfigError(f"{args.plan} with --model {args.model}: {e}") from None
    plot_plan(plan, args.plot)
    print(f"wrote {args.plot}")
    n_layers, n_heads = model_counts(model)
    kept: dict = {}

    def grab(i, q, k, v, scale):
        if i == layer:
            g = q.shape[1] // k.shape[1]
            kept["qk"] = (q[:, head:head + 1].clone(), k[:, head // g:head // g + 1].clone(), scale)

    compiled = torch.compile(model, backend=capture_backend(n_layers, n_heads))
    with torch.no_grad(), capture_qk(grab):
        compiled(ids, use_cache=False, logits_to_keep=1)
    if "qk" not in kept:
        raise ConfigError(f"layer {layer} was not captured (the backend left it dense)")
    q, k, scale = kept["qk"]
    stem, dot, ext = args.plot.rpartition(".")
    path = f"{stem}_L{layer}_H{head}.{ext}" if dot else f"{args.plot}_L{layer}_H{head}.png"
    name = plan.score_name()
    title = f"layer {layer}, head {head}: {hp.describe()}" + (
        "" if hp.score is None else f", recall {hp.score:.3f}" if name == "recall" else f", score {hp.score:.6g}")
    plot_head(q, k, hp, path, scale=scale, title=title)
    print(f"wrote {path}")


def _cmd_convert(args) -> None:
    plan = load_plan(args.src)
    mi = args.to == "minference"
    if args.drop_mass:
        if not mi:
            raise ConfigError("--drop-mass applies to --to minference only (our format keeps mass targets)")
        plan = _drop_mass(plan, "convert")
    inherit = 0 if plan.layers is None else sum(
        hp.pattern is Pattern.VERTICAL_SLASH and hp.mass is None for layer in plan.layers for hp in layer)
    if mi and inherit:
        print(f"mif-compile convert: note: {inherit} vertical-slash head(s) take the backend's mass setting (default "
              f"{DEFAULT_MASS}, the adaptive index); MInference's format means fixed budgets, so they read back "
              "as mass='fixed'", file=sys.stderr)
    if mi and plan.layers is not None and plan.default != ModelPlan(plan.layers).default:
        print(f"mif-compile convert: note: MInference's format has no default pattern; {plan.default.describe()} "
              "is not written (a per-layer plan does not use it; it reads back as dense)", file=sys.stderr)
    try:
        save_plan(plan, args.dst, minference_format=mi)
    except ConfigError as e:
        raise ConfigError(f"{args.src}: {e}") from None
    print(f"wrote {args.dst} ({args.to} format, {plan.num_layers} layers)")


def _parser() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and the parser of each command."""
    parser = Parser(prog="mif-compile", description=plain(__doc__))
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    srch = sub.add_parser("search", help="choose each head's pattern on one calibration prefill",
                          description="Choose each head's pattern and budget on one calibration prefill.")
    _model_args(srch, required=True)
    srch.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    srch.add_argument("--state", default=None, help="per-layer results, for resuming (default OUT.search/)")
    srch.add_argument("--minference-out", default=None, help="also write the plan in MInference's JSON format")
    srch.add_argument("--candidates", nargs="+", default=None,
                      help="e.g. a_shape:128,3968 vertical_slash:1000,6096 block_sparse:100 dense")
    srch.add_argument("--rule", choices=("target", "budget", "tradeoff"), default="target",
                      help="target: cheapest reaching --target recall; budget: best recall costing <= "
                           "--max-cost; tradeoff: max recall - lam*cost")
    srch.add_argument("--target", type=number(float, 0.0, 1.0, lo_open=True), default=0.95,
                      help="recall to reach (rule target), in (0, 1]")
    srch.add_argument("--max-cost", type=number(float, 0.0, lo_open=True), default=0.1,
                      help="share of dense (rule budget)")
    srch.add_argument("--lam", type=number(float, 0.0), default=1.0)
    srch.add_argument("--cost", choices=("auto", "pairs", "time"), default="auto",
                      help="pairs: kept-key count; time: measured kernel time (CUDA); auto: time on CUDA")
    srch.add_argument("--rows-last", type=number(int, 0), default=128, help="sampled query rows at the end")
    srch.add_argument("--rows-spread", type=number(int, 0), default=384,
                      help="sampled query rows spread over the prompt")
    srch.add_argument("--min-row", type=number(int, 0), default=None, help="first sampled row (default N/8)")
    srch.add_argument("--last-q", type=number(int, 1), default=64)
    srch.add_argument("--block-m", type=int, default=64, choices=(64, 128),
                      help="query block of the scored index (default 64; the op runs 128, whose kept keys include "
                           "those at 64 except a run's last-block overshoot, so recall is about a lower bound)")
    srch.add_argument("--modes", type=_modes, default=("fixed",), metavar="fixed,mass",
                      help="vertical-slash candidates to score: fixed (MInference's fixed budgets, the default) "
                           "and/or mass (the adaptive index: every --mass-caps cap with every --masses target)")
    srch.add_argument("--masses", type=_float_list, default=None, metavar="0.9,0.95,...",
                      help="mass targets of mode mass (default 0.9,0.95,0.99,0.999)")
    srch.add_argument("--mass-caps", type=_cap, nargs="+", default=None, metavar="V,S",
                      help="(v, s) caps of mode mass (default 30,6096 100,6096 1000,6096)")
    srch.add_argument("--drop-mass", action="store_true",
                      help="with --minference-out: write mass-targeted heads with their caps as fixed budgets")
    srch.add_argument("--inductor", action="store_true", help="compile the rest of the model with Inductor")
    srch.add_argument("--no-progress", action="store_true")

    show = sub.add_parser("show", help="print a per-layer summary of a plan (ours or MInference's)",
                          description="Print a per-layer summary of a plan (ours or MInference's JSON); --plot "
                                      "draws it, --head also one head's attention map.")
    show.add_argument("plan")
    show.add_argument("--plot", default=None, metavar="OUT.png", help="draw patterns and recall per layer/head")
    show.add_argument("--head", default=None, metavar="L:H",
                      help="also draw this head's attention map and kept keys (OUT_L{L}_H{H}.png)")
    _model_args(show, required=False)

    sub.add_parser("eval", help="accuracy of dense vs sparse runs (see: mif-compile eval --help)", add_help=False)
    conv = sub.add_parser("convert", help="convert a plan between our JSON and MInference's",
                          description="Convert a plan between our JSON and MInference's per-head JSON.")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=("ours", "minference"), default="ours")
    conv.add_argument("--drop-mass", action="store_true",
                      help="with --to minference: write mass-targeted heads with their caps as fixed budgets "
                           "(MInference's format has no mass target; without this flag such a plan is refused)")
    add_debug(conv)
    return parser, {"search": srch, "show": show, "convert": conv}


def main(argv: list[str] | None = None) -> int:
    """The console script. Errors are one line on stderr with exit code 2 (bad input) or 1; ``--debug``
    shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # the evaluation harness has its own parser
        from .evaluate import main as eval_main

        return eval_main(argv[1:], prog="mif-compile eval")
    parser, commands = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's parser, so that the message names the command
            commands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or a one-line argument error
        return int(e.code or 0)
    from .search import SearchError

    run = {"search": _cmd_search, "show": _cmd_show, "convert": _cmd_convert}[args.cmd]
    return run_command(f"mif-compile {args.cmd}", lambda: run(args), args.debug, (SearchError,))


if __name__ == "__main__":
    sys.exit(main())
