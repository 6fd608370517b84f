"""The ``npinv`` command line: parsing (flags derived from :mod:`npinv.settings`) and printing over :mod:`npinv.service`.

User errors print one line ``npinv: error: ...`` and exit with code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from npinv.errors import NpinvError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise NpinvError(f"{message} (see npinv {self.prog.split()[-1]} --help)" if " " in self.prog else message)


def _number(text: str) -> float:
    """argparse type of every numeric flag: a finite number ("nan" and "inf" would pass every range check)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _global_args(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """Options every command takes, before or after its name (``npinv -q edit ...`` or ``npinv edit
    ... -q``). On a sub-command they default to SUPPRESS, so an unset one does not undo the top one."""
    quiet = {"default": False} if top else {"default": argparse.SUPPRESS}
    threads = {"default": None} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines", **quiet)
    p.add_argument("--threads", type=int, metavar="N", **threads,
                   help="CPU threads torch uses (default $NPINV_THREADS, else $OMP_NUM_THREADS if set, else the "
                        "CPUs this process may use divided by the processes launched together)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors file, hub id, or an embedded model: shapes (the default, "
                        "a UNet) or shapes-flow (an SD3-layout flow model)")
    p.add_argument("--model-config", default=None, help="diffusers folder or hub id with configs for a single file")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a trusted .ckpt/.bin/.pt checkpoint")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="UNet / transformer and text encoder precision (default fp32; the step arithmetic stays fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay UNet calls as CUDA graphs (default: on; no effect on CPU or MPS, nor on flow "
                        "models, whose transformer calls run eagerly)")
    p.add_argument("--offload", action="store_true",
                   help="CUDA only: keep the networks in CPU memory and move each to the GPU while it runs "
                        "(diffusers' model CPU offload: for FLUX.1 / SD3.5-Large on a smaller card; slower)")


LIST_KINDS = ("WordWindows", "WordNumbers")


def _setting_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                   defaults: dict | None = None) -> None:
    """One flag per setting of ``cls`` (see :mod:`npinv.settings`), its help and default from the
    schema. Unset flags stay absent from the parsed namespace: :func:`_settings` reads the given ones
    through the schema, so a bad value gets the message a manifest row or the web app gets."""
    from npinv.settings import Choice, Flag, WordPair, default_of, flag_name, specs

    for f, spec in specs(cls):
        if f.name in skip:
            continue
        names = [f"--{flag_name(f.name)}", *(f"--{a}" for a in spec.aliases)]
        default = (defaults or {}).get(f.name, default_of(f))
        shown = "" if default in (None, {}, False) or "default" in spec.help else f" (default {default})"
        kind = spec.kind
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": spec.help + shown}
        if isinstance(kind, Flag):
            p.add_argument(*names, action="store_true", **common)
        elif isinstance(kind, WordPair):
            p.add_argument(*names, nargs=2, metavar=("SRC_WORD", "TGT_WORD"), **common)
        elif type(kind).__name__ in LIST_KINDS:
            p.add_argument(*names, action="append", metavar=spec.metavar, **common)
        elif isinstance(kind, Choice):
            choices = [str(c) for c in kind.choices()]
            p.add_argument(*names, metavar="{" + ",".join(choices) + "}", **common)
        else:
            p.add_argument(*names, metavar=spec.metavar, **common)


class _Refused(argparse.Action):
    """A flag a command does not take but a user may carry over from another: one line saying why,
    rather than argparse's "unrecognized arguments" (or, worse, accepting and ignoring it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise NpinvError(f"{option_string} does not apply: {self.const}")


def _refused_flags(p: argparse.ArgumentParser, names: tuple[str, ...], why: str) -> None:
    from npinv.settings import flag_name

    for name in names:
        p.add_argument(f"--{flag_name(name)}", nargs="?", action=_Refused, const=why, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def _settings(args, cls: type, base=None):
    """The settings of ``cls`` from the flags given (others keep ``base``'s values or the defaults)."""
    from npinv.settings import from_text, specs

    given = {}
    for f, _ in specs(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            given[f.name] = " ".join(value) if isinstance(value, list) else value
    return from_text(cls, given, base)


# InvertSettings that only shape an inversion: generate samples from noise and takes none of them.
GENERATE_SKIPS = ("resize", "invert_scheme", "invert_iters", "invert_tol", "bdia_gamma", "decoder_steps")


def _invert_settings(args, **base):
    from npinv.settings import InvertSettings

    return _settings(args, InvertSettings, InvertSettings(**base) if base else None)


def build_parser() -> argparse.ArgumentParser:
    from npinv.methods import reconstruct_scheme_help
    from npinv.settings import EditSettings, InvertSettings, ReconstructSettings

    parser = _Parser(prog="npinv", description="Fast real-image inversion and editing with diffusion models.")
    _global_args(parser, top=True)
    parser.add_argument("--version", action="version", version=f"npinv {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("reconstruct", help="invert an image and reconstruct it with a method (NPI by default)")
    p.add_argument("image", help="the image to invert (.png, .jpg, .webp, ...)")
    p.add_argument("--prompt", required=True, help="the source prompt describing the image")
    _setting_flags(p, ReconstructSettings)
    # Each method's own default scheme (npinv.methods: BDIA, exact at one UNet call a step, for the NPI family;
    # plain DDIM for the published baselines). Edits keep plain DDIM inversion (the published NPI + P2P setting).
    _setting_flags(p, InvertSettings, defaults={"invert_scheme": reconstruct_scheme_help()})
    p.add_argument("--save-inversion", default=None, help="write the inversion (.safetensors) for later edits")
    p.add_argument("--out", required=True, help="reconstruction image path (.png, .jpg, .webp)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_args(p)

    p = sub.add_parser("edit", help="edit an image with a target prompt (Prompt-to-Prompt + NPI by default)")
    p.add_argument("image", help="the image to edit (.png, .jpg, .webp, ...)")
    p.add_argument("--source", default=None, help="prompt describing the input (optional with --inversion)")
    p.add_argument("--target", action="append", required=True, help="edited prompt; repeat for several edits")
    _setting_flags(p, EditSettings)
    _setting_flags(p, InvertSettings)  # --steps without --inversion: 50; with it: the inversion's
    p.add_argument("--inversion", default=None, help="reuse a saved inversion (.safetensors) instead of inverting")
    p.add_argument("--save-inversion", default=None, help="write the inversion for later edits")
    p.add_argument("--save-attention", default=None, metavar="DIR", help="write per-word cross-attention heat maps")
    p.add_argument("--out", required=True, help="edited image path; with several targets NAME_0.EXT, NAME_1.EXT, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_args(p)

    p = sub.add_parser("edit-batch", help="edit every row of a JSONL/CSV manifest, resumably (accelerate: many processes)")
    p.add_argument("manifest", help='JSONL rows {"image", "source", "targets", ...settings} or CSV image,source,target')
    p.add_argument("--out", required=True, help="output folder: edits/, results.jsonl (reruns resume)")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet call where settings and sizes agree")
    _setting_flags(p, EditSettings)  # each row's defaults; a row's own keys override them
    _setting_flags(p, InvertSettings)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_args(p)

    p = sub.add_parser(
        "edit-video", help="edit every frame of a video with the same settings (NPI + Prompt-to-Prompt)",
        description="Decode the video, DDIM-invert each frame under --source, edit it toward --target with the "
                    "same settings, and re-encode at the source's exact frame rate and frame count. Inversion and "
                    "editing are deterministic (no noise is drawn), so there is no seed: reruns give the same frames.")
    p.add_argument("video", help="input video (anything FFmpeg reads: .mp4, .mov, .mkv, .webm, .avi, .gif, ...)")
    p.add_argument("--source", required=True, help="prompt describing every frame of the input")
    p.add_argument("--target", required=True, help="edited prompt")
    _setting_flags(p, EditSettings)
    _setting_flags(p, InvertSettings)
    p.add_argument("--batch-size", type=int, default=1, help="frames edited per UNet call (default 1)")
    p.add_argument("--max-frames", type=int, default=None, help="edit only the first N frames")
    p.add_argument("--keep-size", action="store_true",
                   help="upscale the edited frames to the source's size (its centre square with --resize crop)")
    p.add_argument("--out", required=True, help="edited video path (.mp4, .m4v, .mov, .mkv, .webm)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_args(p)

    p = sub.add_parser("generate", help="text-to-image sampling")
    p.add_argument("--prompt", required=True, help="the prompt to sample an image of")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise, 0..2**64-1 (default 0)")
    _setting_flags(p, ReconstructSettings, skip=("method",))
    _setting_flags(p, InvertSettings, skip=GENERATE_SKIPS)
    _refused_flags(p, GENERATE_SKIPS, "generate samples from noise and inverts nothing")
    p.add_argument("--out", required=True, help="output image path (.png, .jpg, .webp)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _model_args(p)

    p = sub.add_parser("demo", help="reconstruct a bundled example with DDIM, NTI and NPI (embedded model)")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--example", type=int, default=0, help="which bundled example (default 0)")
    _model_args(p)

    p = sub.add_parser("train-scenes", help="train the embedded shapes model from a config")
    p.add_argument("--config", required=True, help="training config JSON (see configs/shapes64.json)")
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--run-dir", default=None, help="checkpoints and log (default: OUT.run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its last checkpoint (same weights as an "
                        "uninterrupted run)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")

    bench = sub.add_parser("bench", help="benchmarks: reconstruct, edit-shapes, piebench")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    p = bsub.add_parser("reconstruct", help="PSNR/SSIM/seconds/UNet calls per method and step count")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, help="folder of images with NAME.txt prompts or prompts.json")
    src.add_argument("--shapes", type=int, default=None, help="use N held-out scenes (default 8)")
    p.add_argument("--methods", default="ddim1,ddim,nti,npi", metavar="METHOD[@SCHEME],...",
                   help="comma separated methods (ddim1: DDIM at guidance 1, or a method: "
                        f"{', '.join(_method_names())}), each optionally inverted as METHOD@SCHEME: "
                        f"@{', @'.join(_scheme_names())}, @decN (N decoder-inversion steps first), "
                        "@bdia+gGAMMA (BDIA's damping factor), parts joined by + (npi@anderson+dec100); "
                        "without @, plain DDIM inversion (default ddim1,ddim,nti,npi)")
    p.add_argument("--steps", default="10,20,50,100", help="comma separated DDIM step counts (default 10,20,50,100)")
    p.add_argument("--guidance", type=_number, default=7.5, help="guidance scale w of every method but ddim1 "
                   "(default 7.5)")
    p.add_argument("--offset", type=int, default=None, choices=[0, 1],
                   help="timestep offset: 0 as published code, 1 as the SD config (default: the model's config)")
    p.add_argument("--lpips", default=None, metavar="WEIGHTS",
                   help="LPIPS (SqueezeNet) weights file(s), os.pathsep separated (default $NPINV_LPIPS_WEIGHTS)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, summary.json, table.md, plots)")
    _model_args(p)
    p = bsub.add_parser("edit-shapes", help="ground-truth editing benchmark on held-out scenes")
    p.add_argument("--scenes", type=int, default=10, help="held-out scenes to edit (default 10)")
    p.add_argument("--methods", default="npi,proxnpi,nti,ddim",
                   help="comma separated methods (default npi,proxnpi,nti,ddim)")
    p.add_argument("--direct", default="no,yes", help="direct inversion settings to run: no, yes or no,yes")
    p.add_argument("--controllers", default="replace",
                   help="comma separated attention controllers: replace, refine, reweight, none (default replace)")
    p.add_argument("--guidance", default="7.5", help="one or more guidance scales, comma separated")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--no-blend", action="store_true", help="edit without local blend")
    p.add_argument("--cross-replace", type=_number, default=0.8,
                   help="fraction of steps with cross-attention replaced (default 0.8)")
    p.add_argument("--self-replace", type=_number, default=0.6,
                   help="fraction of steps with self-attention replaced (default 0.6)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, summary.json, table.md)")
    _model_args(p)

    p = bsub.add_parser("piebench", help="PIE-Bench: invert and edit every image, score the unedited region")
    p.add_argument("--data", required=True, help="PIE-Bench folder (annotation_images/, mapping_file.json)")
    p.add_argument("--methods", default="npi", help="comma separated: npi,proxnpi,proxnpi-noig,nti,ddim "
                   "(and flowedit on flow models)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=_number, default=None, help="guidance scale w (default: each method's "
                   "published setting, 7.5, and FlowEdit's paper target guidance for flowedit)")
    p.add_argument("--offset", type=int, default=0, choices=[0, 1], help="timestep offset (published: 0)")
    p.add_argument("--types", default=None, help="editing type ids to run, comma separated (default all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--parity", action="store_true", help="score as the published script does (see docs/piebench.md)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, summary.json, table.md)")
    _model_args(p)

    p = sub.add_parser("serve", help="web app: upload, invert once, edit many in the browser (Gradio)",
                       description="Serve an interactive inversion and editing page. Binds to 127.0.0.1 unless "
                                   "--host says otherwise; each browser session keeps its own inversion cache.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the model (default 16)")
    p.add_argument("--max-upload-mb", type=_number, default=20.0, help="largest upload in MB (default 20)")
    p.add_argument("--max-megapixels", type=_number, default=40.0, help="largest image in megapixels (default 40)")
    p.add_argument("--max-steps", type=int, default=200, help="most DDIM steps a user may ask for (default 200)")
    p.add_argument("--max-decoder-steps", type=int, default=1000,
                   help="most decoder-inversion steps a user may ask for (default 1000)")
    p.add_argument("--cache-entries", type=int, default=4, help="inversions kept per session (default 4)")
    p.add_argument("--cache-mb", type=_number, default=256.0, help="MB of inversions kept per session (default 256)")
    p.add_argument("--max-sessions", type=int, default=64, help="sessions whose caches are kept (default 64)")
    _model_args(p)

    p = sub.add_parser("models", help="list the models npinv knows (and --model's family, from its configs)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="also describe this diffusers folder, .safetensors file or hub id "
                   "(its family: unet or flow, and sd3 / flux), read from its configs without loading weights")
    p.add_argument("--model-config", default=None, help="diffusers folder or hub id with configs for a single file")
    for command in _subcommands(parser):
        _global_args(command)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every sub-command's parser, nested ones (bench reconstruct) included, each once."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subcommands(child)]
    return found


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("npinv")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from npinv import __version__

        return __version__


def _method_names() -> tuple[str, ...]:
    from npinv.methods import method_names

    return method_names()


def _scheme_names() -> tuple[str, ...]:
    from npinv.schemes import scheme_names

    return scheme_names()


def _load(args):
    from npinv.model import load_model

    model = load_model(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle, config=args.model_config,
                       cuda_graphs=args.cuda_graphs, offload=args.offload)
    args.resources.enter_context(_quiet_libraries(model))
    return model


@contextlib.contextmanager
def _quiet_libraries(model) -> Iterator[None]:
    """Keep the libraries' own lines about a prompt off stderr while the model runs: diffusers' echo of
    the cut-off end of an over-long prompt at every encoding (the web app drops it from its log the
    same way) and transformers' tokenizer notice. npinv already says it once, in one line."""
    import logging

    from transformers.utils import logging as tlogging

    from npinv.model import QuietTruncation

    before = tlogging.get_verbosity()
    # main() defaults TRANSFORMERS_VERBOSITY to error; transformers reads it only when first imported.
    wanted = getattr(logging, os.environ.get("TRANSFORMERS_VERBOSITY", "error").upper(), logging.ERROR)
    tlogging.set_verbosity(wanted if isinstance(wanted, int) else logging.ERROR)
    try:
        with QuietTruncation.on(model):
            yield
    finally:
        tlogging.set_verbosity(before)


def cmd_reconstruct(args) -> int:
    from npinv.inversion import check_inversion_path
    from npinv.io import check_output_path, load_image, save_image, staged_outputs, tensor_to_image
    from npinv.methods import check_scheme, get_method
    from npinv.service import invert_one, prepare_file, reconstruct_inverted
    from npinv.settings import ReconstructSettings

    out = check_output_path(args.out, inputs=(args.image,))
    if args.save_inversion:
        check_inversion_path(args.save_inversion)
        check_output_path(args.save_inversion, inputs=(args.image, args.out), image=False)
    _check_prompts(prompt=args.prompt)
    settings = _settings(args, ReconstructSettings)
    method = get_method(settings.method)
    inv_settings = _invert_settings(args, invert_scheme=method.reconstruct_scheme)
    check_scheme(method, inv_settings.invert_scheme)
    load_image(args.image)  # bad input fails before the (slow) model load
    _check_before_load(args, inv_settings)
    model = _load(args)
    source = prepare_file(args.image, model, inv_settings)
    inverted = invert_one(model, source, args.prompt, inv_settings, progress=not args.quiet)
    report = reconstruct_inverted(model, inverted, settings, progress=not args.quiet)
    with staged_outputs() as stage:  # all or nothing: a full disk leaves neither file
        save_image(tensor_to_image(report.reconstruction.image), out, stage=stage)
        if args.save_inversion:
            report.reconstruction.inversion.save(args.save_inversion, stage=stage)
    row = report.summary() | {"out": str(out), "model": model.name, "dtype": args.dtype,
                              "size": list(source.image.shape[-2:]), "threads": _torch_threads()}
    if args.save_inversion:
        row["inversion"] = args.save_inversion
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{row['method']}: PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  MSE {row['mse']:.5f}  "
              f"{row['seconds']:.2f} s  {row['unet_calls']} UNet calls ({row['unet_rows']} rows)  -> {out}")
    return 0


def edit_output_paths(out, count: int):
    from pathlib import Path

    out = Path(out)
    edits = [out] if count == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]
    return edits, out.with_name(f"{out.stem}_grid{out.suffix}")


def _edit_settings(args, **extra):
    """EditSettings from the flags, checked, with the model's declared values resolved before the slow
    load: without ``--guidance`` or ``--self-replace``, what the model folder declares (its npinv.json),
    else 7.5 and 0.6."""
    import dataclasses

    from npinv.model import model_facts, model_settings
    from npinv.settings import EditSettings

    settings = _settings(args, EditSettings)
    declared = model_settings(args.model)
    if settings.guidance is None:  # a method's own default (FlowEdit's) depends on the family: read the configs
        declared = dataclasses.replace(declared, family=model_facts(args.model, args.model_config).kind)
    settings = settings.resolved(declared)
    return dataclasses.replace(settings, **extra) if extra else settings


def _window_json(window):
    """A self-replace window as the JSON records and manifests write it (a fraction, or [start, end])."""
    from npinv.settings import Window

    return Window().to_json(window)


def _saved_invert_values(saved) -> dict:
    """The InvertSettings values an inversion file was made with."""
    from npinv.settings import DEFAULT_INVERT_ITERS, DEFAULT_INVERT_TOL

    record = saved.scheme or {}
    return {"steps": saved.steps, "offset": int(saved.schedule["offset"]), "invert_scheme": saved.scheme_name,
            "bdia_gamma": saved.pair_gamma, "invert_iters": record.get("iters") or DEFAULT_INVERT_ITERS,
            "invert_tol": record.get("tol") or DEFAULT_INVERT_TOL, "decoder_steps": record.get("decoder_steps", 0)}


def _check_inversion_flags(args, made: dict) -> None:
    """With --inversion the file's scheme is the edit's: a scheme flag given with another value is refused
    (it would be ignored)."""
    from npinv.settings import InvertSettings, check_value, flag_name, specs

    kinds = {f.name: spec.kind for f, spec in specs(InvertSettings)}
    for name in ("invert_scheme", "invert_iters", "invert_tol", "bdia_gamma", "decoder_steps"):
        if hasattr(args, name):
            given = check_value(name, kinds[name], kinds[name].from_text(getattr(args, name)))  # as the schema reads it
            if given != made[name]:
                raise NpinvError(f"--{flag_name(name)} {getattr(args, name)} does not apply to --inversion "
                                 f"{args.inversion}: it was made with {flag_name(name)} {made[name]}; invert again "
                                 "(without --inversion) to change it")


def cmd_edit(args) -> int:
    import contextlib
    from pathlib import Path

    from npinv.attention.maps import save_attention_maps
    from npinv.editing import check_edit
    from npinv.inversion import Inversion, check_inversion_path
    from npinv.io import check_output_path, image_grid, load_image, save_image, staged_outputs, tensor_to_image
    from npinv.methods import check_scheme
    from npinv.service import edit_image, load_inversion, prepare_file

    edits, grid_path = edit_output_paths(args.out, len(args.target))
    for path in [*edits, grid_path]:
        check_output_path(path, inputs=tuple(p for p in (args.image, args.inversion) if p))
    if args.save_inversion:
        check_inversion_path(args.save_inversion)
        check_output_path(args.save_inversion, inputs=tuple(p for p in (args.image, args.inversion) if p),
                          image=False)
    _check_prompts(source=args.source, target=args.target)
    if args.save_attention and Path(args.save_attention).exists() and not Path(args.save_attention).is_dir():
        raise NpinvError(f"--save-attention {args.save_attention} exists and is not a folder")
    settings = _edit_settings(args, keep_attention_maps=bool(args.save_attention))
    if args.inversion is None and not args.source:
        raise NpinvError("give --source (the prompt describing the input) or --inversion")
    load_image(args.image)
    saved = Inversion.load(args.inversion) if args.inversion else None
    if saved is not None and args.source and args.source != saved.source_prompt:
        raise NpinvError(f"the inversion was made with source prompt {saved.source_prompt!r}, not {args.source!r}")
    base = {} if saved is None else _saved_invert_values(saved)
    if saved is not None:
        from npinv.model import model_facts

        facts = model_facts(args.model, args.model_config)  # the file's family before its grid is checked
        saved.check_architecture(None, architecture=facts.architecture, name=str(args.model or "npinv-shapes-64"))
        _check_inversion_flags(args, base)
    inv_settings = _invert_settings(args, **base)
    check_scheme(settings.method, inv_settings.invert_scheme)
    if saved is not None:  # the inversion's grid is the edit's: take it, refuse another
        if inv_settings.steps != saved.steps:
            raise NpinvError(f"the inversion has {saved.steps} steps; asked for {inv_settings.steps}")
        if inv_settings.offset != base["offset"]:
            raise NpinvError(f"the inversion was made with offset {base['offset']}; asked for --offset "
                             f"{inv_settings.offset}")
    _check_before_load(args, inv_settings, guidance=settings.guidance)
    model = _load(args)
    # The words (blend, reweight, per-word cross-replace) before the inversion's cost and its warnings.
    check_edit(model, args.source or saved.source_prompt, args.target, inv_settings.steps,
                     settings)
    source = prepare_file(args.image, model, inv_settings)
    inverted = load_inversion(args.inversion, model, source, steps=inv_settings.steps) if saved is not None else None
    # An inversion-free method (flowedit) encodes the image only, unless the inversion is to be saved.
    edited = edit_image(model, source, args.source, args.target, settings, inv_settings, inversion=inverted,
                        progress=not args.quiet, encode_only=False if args.save_inversion else None)
    result = edited.result
    tiles = [tensor_to_image(source.image), tensor_to_image(result.source_image)]
    new_maps_folder = bool(args.save_attention) and not Path(args.save_attention).exists()
    try:
        with staged_outputs() as stage:  # all or nothing: a full disk half-way leaves no edit, grid or map
            for k, path in enumerate(edits):
                tile = tensor_to_image(result.images[k : k + 1])
                save_image(tile, path, stage=stage)
                tiles.append(tile)
            save_image(image_grid([tiles], scale=max(1, 256 // source.image.shape[-1])), grid_path, stage=stage)
            if args.save_inversion:
                result.inversion.save(args.save_inversion, stage=stage)
            maps = (save_attention_maps(model, result, result.inversion.source_prompt, args.save_attention,
                                        stage=stage) if args.save_attention else [])
    except BaseException:
        if new_maps_folder:
            with contextlib.suppress(OSError):
                Path(args.save_attention).rmdir()  # the maps' temporaries are gone: only if empty
        raise
    row = {"method": settings.method, "controller": settings.controller, "source": result.inversion.source_prompt,
           "targets": args.target, "steps": result.inversion.steps, "guidance": settings.guidance,
           "self_replace": _window_json(settings.self_replace), "direct": settings.direct,
           "seconds": edited.cost.seconds, "edit_seconds": edited.edit_cost.seconds,
           "unet_calls": edited.cost.unet_calls, "unet_rows": edited.cost.unet_rows,
           "outputs": [str(p) for p in edits], "grid": str(grid_path), "attention_maps": maps,
           **edited.inverted.inversion.scheme_report()}
    if args.json:
        print(json.dumps(row))
    else:
        for target, path in zip(args.target, edits, strict=True):
            print(f"{target!r} -> {path}")
        print(f"grid (input | reconstruction | edits): {grid_path}; {row['seconds']:.2f} s, {row['unet_calls']} "
              f"UNet calls ({row['unet_rows']} rows)")
    return 0


def cmd_generate(args) -> int:
    from npinv.io import check_output_path, save_image, tensor_to_image
    from npinv.progress import note
    from npinv.service import generate
    from npinv.settings import ReconstructSettings

    out = check_output_path(args.out)
    _check_prompts(prompt=args.prompt)
    settings = _settings(args, ReconstructSettings)
    inv_settings = _invert_settings(args)
    _check_before_load(args, inv_settings, inverts=False)  # with --seed: 0..2**64-1, as torch.Generator takes it
    model = _load(args)
    side = (inv_settings.size or model.resolution) // model.vae_scale_factor * model.vae_scale_factor

    def estimate(first: float, total: float) -> None:  # one line once the first step is timed, if the run is long
        if total - first >= LONG_RUN_SECONDS:
            note(f"npinv: generate {side}x{side} px, {inv_settings.steps} steps on {model.device.type}: about "
                 f"{_duration(total)} ({first:.1f} s for the first step)")

    generated = generate(model, args.prompt, seed=args.seed, guidance=settings.guidance, steps=inv_settings.steps,
                         size=inv_settings.size, offset=inv_settings.offset, progress=not args.quiet,
                         estimate=None if args.quiet else estimate)
    save_image(tensor_to_image(generated.image), out)
    row = {"prompt": args.prompt, "seed": args.seed, "steps": inv_settings.steps, "guidance": settings.guidance,
           "seconds": generated.cost.seconds, "unet_calls": generated.cost.unet_calls, "out": str(out),
           "threads": _torch_threads()}
    print(json.dumps(row) if args.json else f"{out}  ({row['seconds']:.2f} s, {row['unet_calls']} UNet calls)")
    return 0


def _torch_threads() -> int:
    """torch's CPU thread count (the seconds of a CPU run depend on it; see npinv.threads)."""
    import torch

    return torch.get_num_threads()


# generate prints an estimate when its sampling loop will take at least this long after the first step.
LONG_RUN_SECONDS = 30.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_demo(args) -> int:
    from pathlib import Path

    from npinv.demo import bundled_examples, run_demo

    if not 0 <= args.example < len(bundled_examples()):
        raise NpinvError(f"--example must lie in 0..{len(bundled_examples()) - 1}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NpinvError(f"--out {out} exists and is not a folder")
    from npinv.settings import InvertSettings

    _check_before_load(args, InvertSettings(steps=args.steps))
    run_demo(_load(args), out, steps=args.steps, example=args.example, progress=not args.quiet)
    return 0


def cmd_train_scenes(args) -> int:
    from pathlib import Path

    from npinv.training import train_scenes

    if not Path(args.config).is_file():
        raise NpinvError(f"no such config file: {args.config}")
    train_scenes(args.config, args.out, args.run_dir, resume=args.resume, device=args.device)
    return 0


def _csv(text: str, cast, flag: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        raise NpinvError(f"{flag}: cannot read {text!r}") from None
    if not values:
        raise NpinvError(f"{flag} is empty")
    return values


def cmd_bench(args) -> int:
    from pathlib import Path

    from npinv.parallel import current_shard

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NpinvError(f"--out {out} exists and is not a folder")
    shard = current_shard()  # accelerate launch / torchrun: this process's share of the rows
    if shard.device and args.device is None:
        args.device = shard.device
    if args.bench == "reconstruct":
        from npinv.bench.reconstruct import reconstruct_settings, reconstruct_table, run_reconstruct_bench

        methods = _csv(args.methods, str, "--methods")
        for m in methods:
            reconstruct_settings(m, args.guidance)  # one line for an unknown label or a bad guidance
        steps = _csv(args.steps, int, "--steps")
        if args.shapes is not None and args.shapes < 1:  # None: the default 8 scenes
            raise NpinvError(f"--shapes must be at least 1, got {args.shapes}")
        model = _load(args)
        summary = run_reconstruct_bench(model, out, images=args.images, shapes=args.shapes, methods=methods,
                                        steps_list=steps, guidance=args.guidance, offset=args.offset,
                                        lpips=args.lpips.split(os.pathsep) if args.lpips else None,
                                        allow_pickle=args.allow_pickle, progress=not args.quiet, shard=shard)
        print(reconstruct_table(summary))
        return 0
    from npinv.attention.controllers import get_controller
    from npinv.bench.edit_shapes import edit_table, run_edit_shapes
    from npinv.methods import get_method

    if args.bench == "piebench":
        from npinv.bench.piebench import load_piebench, piebench_table, run_piebench

        methods = [get_method(m).name for m in _csv(args.methods, str, "--methods")]
        load_piebench(args.data)  # a malformed data set fails before the model loads
        model = _load(args)
        summary = run_piebench(model, args.data, out, methods=methods, steps=args.steps, guidance=args.guidance,
                               offset=args.offset, types=_csv(args.types, str, "--types") if args.types else None,
                               limit=args.limit, parity=args.parity, progress=not args.quiet, shard=shard)
        print(piebench_table(summary))
        return 0

    methods = [get_method(m).name for m in _csv(args.methods, str, "--methods")]
    controllers = [get_controller(c).name for c in _csv(args.controllers, str, "--controllers")]
    directs = _csv(args.direct, lambda v: {"no": False, "yes": True}[v], "--direct")
    model = _load(args)
    summary = run_edit_shapes(model, out, n_scenes=args.scenes, methods=methods, directs=directs,
                              controllers=controllers, guidances=_csv(args.guidance, _number, "--guidance"),
                              steps=args.steps, blend=not args.no_blend, cross_replace=args.cross_replace,
                              self_replace=args.self_replace, progress=not args.quiet, shard=shard)
    print(edit_table(summary))
    return 0


def cmd_serve(args) -> int:
    from npinv.webapp.app import ServeOptions, serve
    from npinv.webapp.engine import Engine, Limits

    # Both check their values here, before the (slow) model load.
    limits = Limits(max_pixels=int(args.max_megapixels * 1e6), max_upload_mb=args.max_upload_mb,
                    max_steps=args.max_steps, max_decoder_steps=args.max_decoder_steps,
                    cache_entries=args.cache_entries, cache_mb=args.cache_mb)
    options = ServeOptions(host=args.host, port=args.port, queue_size=args.queue_size, max_sessions=args.max_sessions)
    serve(Engine(_load(args), limits), options)
    return 0


def cmd_models(args) -> int:
    from npinv.model import EMBEDDED_MODELS, model_facts, model_settings

    def edit_defaults(spec) -> dict:
        """What the model's edits default to (its npinv.json, else npinv's)."""
        declared = model_settings(spec)
        return {"edit_guidance": declared.edit_guidance, "edit_self_replace": _window_json(declared.edit_self_replace)}

    # The embedded models under their --model names ("default" is the one used without --model).
    info = {("default" if n == 0 else m.aliases[0]): {
        "name": m.name, "path": str(m.path), "available": (m.path / "model_index.json").is_file(),
        "family": m.family, "kind": "sd3" if m.family == "flow" else None, "invertible": True,
        **edit_defaults(m.aliases[0])}
        for n, m in enumerate(EMBEDDED_MODELS)}
    if args.model is not None:
        facts = model_facts(args.model, args.model_config)
        info["model"] = {"name": args.model, "path": args.model, "available": True, "family": facts.architecture,
                         "kind": facts.kind, "invertible": not facts.timestep_distilled, **edit_defaults(args.model)}
    if args.json:
        print(json.dumps(info))
    else:
        for key, m in info.items():
            family = m["family"] + (f" ({m['kind']})" if m["kind"] else "")
            window = m["edit_self_replace"]
            window = ",".join(f"{v:g}" for v in window) if isinstance(window, list) else f"{window:g}"
            print(f"{key}: {m['name']}  {m['path']}  {family}" + ("" if m["invertible"] else "  generation only")
                  + f"  edits: guidance {m['edit_guidance']:g}, self-replace {window}")
    return 0


def _check_before_load(args, settings=None, *, guidance=None, inverts: bool = True) -> None:
    """The device, the seed and the model's configs, before the (slow) model load: the step grid
    against the model's scheduler (``--steps 1000`` needs ``--offset 0``; a flow model takes no offset),
    the size against its VAE, a broken model folder (one line naming the file), a model that cannot be
    inverted (FLUX.1-schnell) when the command ``inverts``. ``settings``: the run's InvertSettings."""
    from npinv.checks import check_seed, check_size
    from npinv.model import check_offload, model_facts, parse_device

    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    check_offload(getattr(args, "offload", False), parse_device(args.device))
    facts = model_facts(args.model, args.model_config)
    if inverts:
        facts.check_invertible()
    if settings is None:
        return
    check_size(settings.size, facts.size_multiple, "--size")
    facts.check_grid(settings.steps, settings.offset)


def _check_prompts(**prompts) -> None:
    """Empty or blank prompts, refused by flag name (``--target ""`` would edit toward nothing)."""
    from npinv.checks import check_prompt

    for flag, values in prompts.items():
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                check_prompt(value, f"--{flag.replace('_', '-')}")


def cmd_edit_batch(args) -> int:
    import json
    from pathlib import Path

    from npinv.batch import check_schedules, read_manifest, run_batch
    from npinv.io import check_output_folder
    from npinv.model import model_facts
    from npinv.parallel import FolderLock, current_shard

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NpinvError(f"--out {out} exists and is not a folder")
    if args.batch_size < 1:
        raise NpinvError("--batch-size must be at least 1")
    check_output_folder(out)
    from npinv.settings import EditSettings

    # The flags are each row's defaults; what a row leaves to the model (guidance, self-replace) is resolved
    # with the row's own method when it is edited. ``settings``: that resolution for the flags' method.
    settings = _edit_settings(args)
    inv_settings = _invert_settings(args)
    _check_before_load(args, inv_settings)
    rows = read_manifest(args.manifest, _settings(args, EditSettings), inv_settings)  # checked before the load
    facts = model_facts(args.model, args.model_config)
    check_schedules(rows, facts.scheduler, facts.size_multiple)  # rows' steps, offsets and sizes vs the model
    shard = current_shard()
    if shard.device and args.device is None:
        args.device = shard.device
    FolderLock(out, shard).check()  # another job's folder: refused before the slow model load (run_batch takes it)
    model = _load(args)
    say = None if args.quiet or args.json else (lambda line: print(f"[{shard.label}] {line}", flush=True))
    report = run_batch(model, rows, out, batch_size=args.batch_size, shard=shard, progress=say)
    summary = {"edits": report.total, "done_before": report.done_before, "done_now": report.done_now,
               "results": str(report.results), "seconds": report.seconds, "unet_calls": report.unet_calls,
               "shard": report.shard, "default_guidance": settings.guidance,  # rows without their own guidance
               "default_self_replace": _window_json(settings.self_replace),  # ... or self-replace
               # Edited images made per minute of this run (the inversions included; None if it made none).
               "images_per_minute": 60.0 * report.done_now / report.seconds if report.done_now and report.seconds > 0
               else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"[{shard.label}] {report.done_now} edit(s) now, {report.done_before} done before, of {report.total}; "
              f"{report.seconds:.1f} s, {report.unet_calls} UNet calls; results: {report.results}")
    return 0


def cmd_edit_video(args) -> int:
    from npinv.methods import check_scheme
    from npinv.video import check_video_output, edit_video, probe_video, require_av

    require_av()
    out = check_video_output(args.out, inputs=(args.video,))
    _check_prompts(source=args.source, target=args.target)
    settings = _edit_settings(args)
    inv_settings = _invert_settings(args)
    check_scheme(settings.method, inv_settings.invert_scheme)
    if args.batch_size < 1:
        raise NpinvError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        raise NpinvError(f"--max-frames must be at least 1, got {args.max_frames}")
    _check_before_load(args, inv_settings)
    info = probe_video(args.video)  # a bad or empty video fails before the (slow) model load
    model = _load(args)
    result = edit_video(model, args.video, out, args.source, args.target, settings, inv_settings,
                        batch_size=args.batch_size, max_frames=args.max_frames, keep_size=args.keep_size,
                        progress=not args.quiet)
    row = {"video": args.video, "source": args.source, "target": args.target, "method": settings.method,
           "controller": settings.controller, "steps": inv_settings.steps, "guidance": settings.guidance,
           "self_replace": _window_json(settings.self_replace), "direct": settings.direct,
           "batch_size": args.batch_size, "model": model.name,
           "source_frames": info.frames} | result.summary()
    if args.json:
        print(json.dumps(row))
    else:
        tc = result.temporal_consistency
        change = "n/a (fewer than two frames or a still video)" if tc is None else (
            f"{tc:.3f} (edit {result.edit_change:.4f} / source {result.source_change:.4f} mean frame-to-frame change)")
        print(f"{result.frames} frames at {row['fps']} fps, {result.width}x{result.height} ({result.codec}) -> {out}")
        print(f"{row['seconds_per_frame_median']:.2f} s/frame (median), {result.seconds:.1f} s, "
              f"{result.unet_calls} UNet calls ({result.unet_rows} rows); temporal consistency {change}")
    return 0


COMMANDS = {"reconstruct": cmd_reconstruct, "edit": cmd_edit, "generate": cmd_generate, "demo": cmd_demo,
            "train-scenes": cmd_train_scenes, "bench": cmd_bench, "models": cmd_models}
COMMANDS["edit-video"] = cmd_edit_video
COMMANDS["edit-batch"] = cmd_edit_batch
COMMANDS["serve"] = cmd_serve


def _one_line_warnings():
    """``warnings.showwarning`` for one run: each warning one line, and a message said once (the
    source and target prompts are encoded in different places, but one long prompt is one warning)."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            print(f"npinv: warning: {message}", file=sys.stderr)

    return show


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a cancelled CI job), raised where the program is, as Ctrl-C's
    KeyboardInterrupt is: every ``finally`` runs, so staged outputs leave no temporary file behind."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    from npinv.threads import choose_threads, torch_threads, usable_cpus

    with contextlib.ExitStack() as resources:
        args.resources = resources  # what the command holds until it ends (see _load)
        if args.command != "models":  # the one command without torch work
            resources.enter_context(torch_threads(choose_threads(args.threads, os.environ, usable_cpus())))
        return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.showwarning = _one_line_warnings()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        with _sigterm_as_interrupt():
            args = build_parser().parse_args(argv)
            return _run(args)
    except NpinvError as exc:
        print(f"npinv: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("npinv: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("npinv: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder, ...: the one mapping, in npinv.errors
        from npinv.errors import user_os_error_line

        line = user_os_error_line(exc)
        if line is None:
            return _internal_error(exc)
        print(f"npinv: error: {line}", file=sys.stderr)
        return 2
    except MemoryError:
        print("npinv: error: out of memory; try a smaller --size or --dtype fp16", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: keep it short unless asked
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    if os.environ.get("NPINV_DEBUG"):
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(f"npinv: internal error: {type(exc).__name__}: {first} (set NPINV_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
