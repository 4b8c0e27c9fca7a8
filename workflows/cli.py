"""The `rayclip` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pydantic import ValidationError

from .tracking import failure, is_mlflow_error, rayclip_version, redact

OTHER_WEIGHTS = ("; also weights as others hold them (OpenAI's .pt, OpenCLIP's, a Hugging Face CLIPModel directory), "
                 "made a checkpoint of on the way")
INDEX_HELP = ("embeddings of the served model (`rayclip embed`'s output, a directory or s3:// prefix) that "
              "POST /v1/search looks through")
MODEL_HELP = "checkpoint directory, s3:// prefix, or models:/NAME@ALIAS | models:/NAME/VERSION" + OTHER_WEIGHTS


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .pipeline import PipelineError

    overrides = [f"train.steps={args.steps}"] if args.steps is not None else []
    try:
        run_demo([*overrides, *args.set], config_path=args.config, keep_serving=args.keep_serving)
    except PipelineError as exc:  # as `rayclip run` answers it
        print(f"rayclip demo: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, load_config, run
    from .runtime import joined_cluster

    try:
        outcome = run(load_config(args.config, args.set))
    except PipelineError as exc:
        print(f"rayclip run: {exc}", file=sys.stderr)
        return 1
    if "url" in outcome and args.keep_serving:
        from .demo import serve_until_interrupted

        serve_until_interrupted(print)
    elif "url" in outcome and not joined_cluster():
        print("run: this command started Ray itself, so the service stops with it; --keep-serving keeps it up, "
              "and on a cluster (RAY_ADDRESS, `ray job submit`) it stays", flush=True)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from .pipeline import load_config, show

    print(show(load_config(args.config, args.set)), end="")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocess import PreprocessOptions, preprocess

    options = PreprocessOptions(format=args.format, image_key=args.image_key, caption_key=args.caption_key,
                                label_key=args.label_key, csv_separator=args.csv_separator,
                                classnames=args.classnames, image_size=args.image_size,
                                image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                                rows_per_shard=args.rows_per_shard, dedupe=not args.no_dedupe,
                                shuffle=not args.no_shuffle, concurrency=args.concurrency, num_cpus=args.num_cpus,
                                batch_size=args.batch_size)
    preprocess(args.source, args.output, options)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import train

    train(_train_config(args))
    return 0


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `rayclip train`: flags over --set over the --config file over $MLFLOW_TRACKING_URI
    (a flag's `dest` is its TrainConfig field)."""
    from .pipeline import ConfigError, _set
    from .train import TrainConfig

    values = _read_config_file(args.config) if args.config else {}
    if not values.get("mlflow_tracking_uri"):  # flag > file > environment, as for serve
        values["mlflow_tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI")
    for assignment in args.set:
        key = assignment.removeprefix("train.")
        field = key.partition("=")[0].partition(".")[0]  # fault_injection.step=3 sets a field of a section
        if field not in TrainConfig.model_fields:
            raise ConfigError(f"--set {assignment!r}: {field!r} is not a train option; the options are "
                              f"{', '.join(TrainConfig.model_fields)}")
        _set(values, key, TrainConfig)
    values.update({field: value for field, value in vars(args).items()
                   if field in TrainConfig.model_fields and value is not None})
    return TrainConfig(**values)


def _tracking_uri(args: argparse.Namespace) -> str | None:
    return args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def _evaluate(args: argparse.Namespace) -> int:
    from . import storage
    from .evaluate import TEMPLATE_SETS, EvaluateConfig, evaluate

    templates = args.templates if args.templates in TEMPLATE_SETS else storage.read_lines(args.templates) \
        if args.templates else "default"
    config = EvaluateConfig(model=args.model, zeroshot=args.zeroshot, retrieval=args.retrieval,
                            linear_probe=args.linear_probe,
                            classnames=storage.read_lines(args.classnames) if args.classnames else None,
                            templates=templates, batch_size=args.batch_size, workers=args.workers,
                            use_gpu=args.gpu, output_json=args.json, mlflow_tracking_uri=_tracking_uri(args),
                            quick_gelu=args.quick_gelu,
                            **({"shots": args.shots} if args.shots else {}))
    evaluate(config)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .embed import EmbedConfig, embed

    embed(EmbedConfig(model=args.model, data=args.data, output=args.output, quick_gelu=args.quick_gelu,
                      text=args.text, dtype=args.dtype, rows_per_file=args.rows_per_file,
                      batch_size=args.batch_size, workers=args.workers, use_gpu=args.gpu,
                      mlflow_tracking_uri=_tracking_uri(args)))
    return 0


def _register(args: argparse.Namespace) -> int:
    from .registry import register

    metrics = _evaluate_json(args.metrics) if args.metrics else None
    register(args.checkpoint, args.name, metrics=metrics, tracking_uri=_tracking_uri(args), quick_gelu=args.quick_gelu)
    return 0


def _evaluate_json(uri: str) -> dict:
    """The metrics `rayclip evaluate --json` wrote at `uri` (local or s3://), refused (ValueError) unless they
    are its JSON object of sections, each an object, which is what the registry reads."""
    import json

    from . import storage
    from .registry import EVAL_SECTIONS

    expected = "not the JSON object `rayclip evaluate --json` writes ({\"zeroshot\": {\"top1\": …}, …})"
    try:
        metrics = json.loads(storage.read_bytes(uri, max_bytes=64 * 2**20))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--metrics {uri}: {expected}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise ValueError(f"--metrics {uri}: {expected}: the file holds no object at its top level")
    for section in ("model", *EVAL_SECTIONS):
        if not isinstance(metrics.get(section, {}), dict):
            raise ValueError(f"--metrics {uri}: {expected}: its {section!r} section is not an object")
    return metrics


def _promote(args: argparse.Namespace) -> int:
    from .registry import Gate, promote

    decision = promote(args.name, args.version, force=args.force, tracking_uri=_tracking_uri(args),
                       gate=Gate(metric=args.metric, max_drop=args.max_drop, floor=args.floor))
    return 0 if decision["decision"] in ("passed", "forced") else 1


def _rollback(args: argparse.Namespace) -> int:
    from .registry import rollback

    rollback(args.name, tracking_uri=_tracking_uri(args))
    return 0


def _models(args: argparse.Namespace) -> int:
    from .registry import format_versions, list_versions

    print(format_versions(list_versions(args.name, tracking_uri=_tracking_uri(args)), metric=args.metric))
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    import clip_core
    from clip_core.checkpoint import WEIGHTS_FILE

    from . import storage
    from .registry import fetch_checkpoint

    output = storage.absolute(args.output)
    storage.filesystem(output)  # a scheme storage cannot write fails before the model is fetched
    with tempfile.TemporaryDirectory() as scratch:
        source = fetch_checkpoint(args.model, scratch, tracking_uri=_tracking_uri(args), quick_gelu=args.quick_gelu)
        model = clip_core.load_model(source.directory)
        written = os.path.join(scratch, "export")  # then copied to the output: a local path or s3://
        if args.to == "hf":
            clip_core.export_hf(model, written)
            storage.copy_directory(written, output, last=WEIGHTS_FILE)
            what = "a transformers CLIPModel directory"
        else:
            clip_core.export_openclip(model, written)
            storage.copy(written, output)
            what = "an OpenCLIP checkpoint"
    print(f"export: {args.model} -> {output} ({what})")
    return 0


def _serve_config(args: argparse.Namespace):
    """The app's ServeConfig and route prefix: --config (ServeConfig fields, or a `serve deploy` file such
    as deploy/serve_config.yaml), then the flags."""
    from deploy.rollout import deploy_file_options
    from deploy.serve import APP_NAME, ServeConfig, open_warning, with_environment_token

    values, route_prefix = _read_config_file(args.config) if args.config else {}, "/"
    if "applications" in values:
        values, route_prefix = deploy_file_options(values, getattr(args, "name", APP_NAME), args.config)
    values.update({k: v for k, v in {"model": args.model, "host": args.host, "port": args.port,
                                     "mlflow_tracking_uri": args.mlflow_tracking_uri,
                                     "quick_gelu": args.quick_gelu, "index": args.index}.items() if v is not None})
    if not values.get("mlflow_tracking_uri") and os.environ.get("MLFLOW_TRACKING_URI"):
        values["mlflow_tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]  # below the flag and the file
    config = ServeConfig(**with_environment_token(values))
    if warning := open_warning(config):
        print(f"rayclip {args.command}: {warning}", file=sys.stderr)
    return config, getattr(args, "route_prefix", None) or route_prefix


def _seconds(text: str) -> float:
    """A poll interval; bounded because `Event.wait` overflows on inf or 1e300, and only once the service is up."""
    value = float(text)
    if not 0 < value <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds above 0, at most 86400 (a day)")
    return value


def _follow_registry(stopping, every: float, name: str, model: str | None = None, *, now: bool = False) -> None:
    """Until `stopping` is set, every `every` seconds (and first at once with `now`, whose failures other
    than a version that cannot be loaded or was not ready in time stop it: no such app, say): roll app
    `name` to the version its model alias names now (after `rayclip promote`/`rollback`). A version that
    cannot be loaded is passed over from then on; one whose replicas were not ready in time is tried again
    after 1, 3, 7, … polls (at most an hour's): each try loads it on every tower, then puts them back;
    other failures are reported, and the next poll tries again."""
    from deploy.rollout import CannotLoad, NotReady, reload

    unloadable: set[str] = set()  # a broken version is downloaded once, not at every poll
    not_ready: dict[str, tuple[int, int]] = {}  # version → (its tries, the poll it is tried again at)
    most_polls = max(1, int(3600 / every))
    first, poll = now, 0
    while first or not stopping.wait(every):
        waiting = {version for version, (_, at) in not_ready.items() if poll < at}
        try:
            reload(name, model, echo=lambda line: print(line, flush=True), skip=unloadable | waiting)
        except CannotLoad as exc:
            unloadable.add(exc.model)
            print(f"{exc}\n{name}: the poll will not try {exc.model} again: promote another version, or try it "
                  "once more with `rayclip deploy --reload`", flush=True)
        except NotReady as exc:  # a version whose replicas were slow to start is tried again, less often
            tries = not_ready.get(exc.model, (0, 0))[0] + 1
            wait = min(2**tries - 1, most_polls)
            not_ready[exc.model] = (tries, poll + wait + 1)
            print(f"{exc}\n{name}: tried {tries} time(s); the poll tries it again in {(wait + 1) * every:g} s",
                  flush=True)
        except Exception as exc:  # a registry hiccup must not stop the service; the next poll retries
            if first:
                raise
            print(f"{name}: registry poll failed, still serving the current version: {redact(str(exc))}", flush=True)
        first, poll = False, poll + 1


def _serve(args: argparse.Namespace) -> int:
    import ray

    from deploy.rollout import start, stop
    from deploy.serve import APP_NAME

    from .runtime import stop_on_signals

    config, route_prefix = _serve_config(args)
    url = start(config, route_prefix=route_prefix)
    stopping = stop_on_signals()
    print(f"serve: {config.model} at {url}  (API docs {url}/docs, playground {url}/); Ctrl-C stops", flush=True)
    if args.poll_registry:
        _follow_registry(stopping, args.poll_registry, APP_NAME)
    stopping.wait()
    print("serve: shutting down", flush=True)
    stop(APP_NAME)
    ray.shutdown()
    return 0


def _deploy(args: argparse.Namespace) -> int:
    import ray

    from deploy.rollout import reload, start

    fixed = [flag for flag, value in (("--config", args.config), ("--host", args.host), ("--port", args.port),
                                      ("--route-prefix", args.route_prefix), ("--index", args.index),
                                      ("--[no-]quick-gelu", args.quick_gelu),
                                      ("--mlflow-tracking-uri", args.mlflow_tracking_uri)) if value is not None]
    if args.reload and fixed:
        raise ValueError(f"--reload only rolls the running app to another model version; {', '.join(fixed)} "
                         "change how the app is deployed: deploy again without --reload")
    if not ray.is_initialized():
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="WARNING")
    if args.reload and not args.poll_registry:
        reload(args.name, args.model)
    elif not args.reload:
        config, route_prefix = _serve_config(args)
        start(config, name=args.name, route_prefix=route_prefix)
        print(f"deploy: {args.name} runs {config.model} on the cluster's Serve (route {route_prefix})")
    if args.poll_registry:
        from .runtime import stop_on_signals

        stopping = stop_on_signals()
        print(f"deploy: {args.name} follows its model alias (checked every {args.poll_registry:g} s); Ctrl-C stops",
              flush=True)
        _follow_registry(stopping, args.poll_registry, args.name, args.model, now=args.reload)
    return 0


def _read_config_file(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayclip", description="CLIP as a distributed workflow on Ray")
    parser.add_argument("--version", action="version", version=f"rayclip {rayclip_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set train.steps=50 (repeatable)")
    demo = commands.add_parser("demo", parents=[overrides], help="the whole pipeline on the embedded defaults: "
                               "synthetic data, tiny CLIP, local Ray, sqlite MLflow; then asks the live service",
                               description="Preprocess → train → evaluate → register → promote → serve on the "
                               "built-in synthetic shapes under ./work, then zero-shot requests for colour-shape "
                               "combinations the model never saw. Rerunning skips the stages already done.")
    demo.add_argument("--steps", type=int, help="optimizer steps (default: the pipeline's 100)")
    demo.add_argument("--config", help="a pipeline config instead of the embedded defaults")
    demo.add_argument("--keep-serving", action="store_true", help="leave the service up until Ctrl-C")
    demo.set_defaults(handler=_demo)

    rn = commands.add_parser("run", parents=[overrides], help="preprocess → train → evaluate → register → promote → "
                             "deploy from one pipeline config (a Ray job)",
                             description="Run every stage of CONFIG; each stage whose output exists for the same "
                             "inputs is skipped, so a rerun after a failure resumes at the failed stage.")
    rn.add_argument("config", nargs="?", help="a pipeline config (default: the embedded defaults, as the demo)")
    rn.add_argument("--keep-serving", action="store_true", help="on a local Ray: leave the service up until Ctrl-C")
    rn.set_defaults(handler=_run)

    cf = commands.add_parser("config", help="pipeline configs")
    cf_commands = cf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cs = cf_commands.add_parser("show", parents=[overrides], help="print the resolved pipeline config")
    cs.add_argument("config", nargs="?", help="default: the embedded defaults")
    cs.set_defaults(handler=_config_show)

    pre = commands.add_parser("preprocess", help="raw image-text pairs → prepared shards + manifest (Ray Data)",
                              description="Validate, decode, resize, tokenize and shard raw pairs. SOURCE is a file, "
                              "a directory, a brace pattern (shard-{00000..00099}.tar), an s3:// prefix, or "
                              "synthetic://train?count=N&seed=S&image_size=P.")
    pre.add_argument("source")
    pre.add_argument("output", help="directory or s3:// prefix for manifest.json, shards/ and rejects.parquet")
    pre.add_argument("--format", choices=["webdataset", "parquet", "csv", "folder", "imagefolder", "synthetic"],
                     help="folder: images with caption sidecars; imagefolder: a folder of images per class (an "
                     "ImageNet val directory, OpenCLIP's --imagenet-val), labeled by folder in sorted order and "
                     "captioned with the folder's name")
    pre.add_argument("--image-key", help="image column (parquet/csv) or member extension (webdataset/folder)")
    pre.add_argument("--caption-key", help="caption column or member extension (default txt/caption); json: the "
                     "'caption' field of each sample's .json (webdataset's, img2dataset's)")
    pre.add_argument("--label-key", help="label column or member extension, for labeled evaluation sets")
    pre.add_argument("--csv-separator", help="a CSV's column separator, one character ('\\t' for a tab, as "
                     "OpenCLIP's --csv-separator defaults to; default: a tab in a .tsv, a comma otherwise)")
    pre.add_argument("--classnames", help="file (local or s3://) with one class name per line; line i is label i")
    pre.add_argument("--image-size", type=int, default=224)
    pre.add_argument("--image-format", choices=["jpeg", "png", "webp"], default="jpeg")
    pre.add_argument("--jpeg-quality", type=int, default=95)
    pre.add_argument("--rows-per-shard", type=int, default=10_000)
    pre.add_argument("--concurrency", type=int, help="at most this many processing tasks at once")
    pre.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per processing task")
    pre.add_argument("--batch-size", type=int, default=256, help="rows per processing task")
    pre.add_argument("--no-dedupe", action="store_true", help="keep exact duplicate images")
    pre.add_argument("--no-shuffle", action="store_true", help="write rows in source order (default: a seeded "
                     "random order, so every shard is a sample of the whole source)")
    pre.set_defaults(handler=_preprocess)

    activation = argparse.ArgumentParser(add_help=False)
    activation.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction,
                            help="weights in another format were trained with QuickGELU (--no-quick-gelu: GELU), "
                            "whatever they imply; for a bare state dict, which says nothing, GELU is assumed with a "
                            "warning (OpenCLIP issue #771). A rayclip checkpoint keeps the activation it records")

    tr = commands.add_parser("train", help="contrastive training on Ray Train; the final checkpoint goes to --output",
                             description="Train CLIP on prepared datasets. --batch-size is the global contrastive "
                             "batch, split across --workers (unlike OpenCLIP's per-GPU flag); --steps counts "
                             "optimizer steps. Unset recipe values come from the preset's tested recipe.")
    tr.add_argument("--config", help="YAML file of train options (any TrainConfig field); --set and flags "
                    "override it")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any train option, e.g. --set shuffle_buffer=2048 (repeatable; flags override it)")
    tr.add_argument("--data", action="append", help="prepared dataset (repeat for several)")
    tr.add_argument("--data-weights", type=float, nargs="+", metavar="WEIGHT",
                    help="sampling weight per --data set (OpenCLIP's --train-data-upsampling-factors)")
    tr.add_argument("--val", help="prepared captioned set for validation loss and retrieval R@1")
    tr.add_argument("--zeroshot", help="prepared labeled set for zero-shot top-1")
    tr.add_argument("--output", help="directory or s3:// prefix for the final checkpoint")
    tr.add_argument("--model", help="preset name or model-config JSON (default tiny)")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--force-image-size", type=int, dest="image_size", metavar="PIXELS",
                    help="train at this resolution instead of the model's (--init weights are interpolated)")
    tr.add_argument("--train-num-samples", type=int, help="samples per epoch (default: one pass over the data)")
    tr.add_argument("--batch-size", type=int, help="global contrastive batch")
    tr.add_argument("--accum-freq", type=int, help="micro-batches per step (the contrastive batch stays whole)")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--warmup", type=int, dest="warmup_steps", metavar="STEPS", help="linear warmup steps")
    tr.add_argument("--lr-scheduler", choices=["cosine", "const", "const-cooldown"],
                    help="after warmup: cosine decay (default), the rate held, or held then cooled down")
    tr.add_argument("--cooldown-steps", type=int, metavar="STEPS",
                    help="const-cooldown: the last STEPS decay the rate (OpenCLIP's --epochs-cooldown)")
    tr.add_argument("--lr-cooldown-power", type=float, help="const-cooldown: 1 linear (default), else polynomial")
    tr.add_argument("--lr-cooldown-end", type=float, help="const-cooldown: the rate it ends at (default 0)")
    tr.add_argument("--wd", type=float, dest="weight_decay", help="weight decay (gains, biases and the "
                    "temperature are exempt, as in OpenCLIP)")
    tr.add_argument("--beta1", type=float)
    tr.add_argument("--beta2", type=float)
    tr.add_argument("--eps", type=float)
    tr.add_argument("--grad-clip-norm", type=float)
    tr.add_argument("--siglip", action="store_const", const="siglip", dest="loss",
                    help="the sigmoid loss (SigLIP) instead of CLIP's softmax")
    tr.add_argument("--lock-image", action="store_true", default=None, help="freeze the image tower (LiT)")
    tr.add_argument("--lock-image-unlocked-groups", type=int, dest="lock_image_unlocked_layers", metavar="N",
                    help="with --lock-image: leave its last N layer groups trainable, as OpenCLIP groups them")
    tr.add_argument("--lock-text", action="store_true", default=None, help="freeze the text tower")
    tr.add_argument("--lock-text-unlocked-layers", type=int, metavar="N",
                    help="with --lock-text: leave its last N layer groups trainable, as OpenCLIP groups them")
    tr.add_argument("--aug-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="the random resized crop's area range (default 0.9 1.0; OpenCLIP's --aug-cfg scale)")
    tr.add_argument("--grad-checkpointing", action="store_true", default=None,
                    help="recompute activations in the backward pass (less memory, ~a third more compute)")
    tr.add_argument("--torchcompile", "--compile", action="store_true", default=None, dest="compile",
                    help="torch.compile each worker's model")
    tr.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    tr.add_argument("--gpu", action="store_true", default=None, dest="use_gpu", help="one GPU per worker")
    tr.add_argument("--strategy", choices=["ddp", "fsdp"],
                    help="ddp (default) replicates the model; fsdp shards weights, gradients and optimizer state")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    tr.add_argument("--patch-dropout", type=float, metavar="FRACTION",
                    help="drop this fraction of each training image's patches (FLIP; ViT only)")
    tr.add_argument("--unmasked-tuning-steps", type=int, metavar="N",
                    help="with --patch-dropout: the last N steps see every patch (FLIP's unmasked tuning)")
    tr.add_argument("--storage", help="Ray Train storage for checkpoints (local dir or s3://)")
    tr.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    tr.add_argument("--num-to-keep", type=int, metavar="N", help="checkpoints kept (default 2)")
    tr.add_argument("--checkpoint-metric", help="keep the best by this metric (val_loss, zeroshot_top1, ...) "
                    "instead of the newest")
    tr.add_argument("--val-every", type=int, metavar="STEPS", help="validate every N steps too (it always does "
                    "at each checkpoint)")
    tr.add_argument("--log-every-n-steps", type=int, dest="log_every", metavar="N")
    tr.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")
    tr.add_argument("--init", help="pretrained weights: openai:PATH, openclip:PATH, or a checkpoint directory "
                    "(ours, OpenCLIP's or a Hugging Face CLIPModel's) or weights file (local or s3://)")
    tr.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction,
                    help="QuickGELU (--no-quick-gelu: GELU) instead of the preset's own, as OpenCLIP's "
                    "--force-quick-gelu; with --init, whatever the weights imply (openai: QuickGELU)")
    tr.add_argument("--run-name", help="the Ray Train run's name under --storage (OpenCLIP's --name; default: "
                    "train-<time>-<pid>); --resume latest then looks in this run only; a name whose run has "
                    "checkpoints is refused unless --resume latest carries it on")
    tr.add_argument("--resume", help="'latest' (the newest checkpoint under --storage, of --run-name when given, "
                    "of this model on this data) or a checkpoint path")
    tr.add_argument("--mlflow-tracking-uri", help="default: $MLFLOW_TRACKING_URI; no tracking when unset")
    tr.add_argument("--seed", type=int)
    tr.set_defaults(handler=_train)

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--mlflow-tracking-uri", help="default: $MLFLOW_TRACKING_URI, else MLflow's default "
                          "store; evaluate logs no run without either")

    actors = argparse.ArgumentParser(add_help=False)
    actors.add_argument("--batch-size", type=int, default=256)
    actors.add_argument("--workers", type=int, default=1, help="model actors")
    actors.add_argument("--gpu", action="store_true", help="one GPU per model actor")

    ev = commands.add_parser("evaluate", parents=[tracking, activation, actors],
                             help="zero-shot, retrieval and linear-probe metrics (Ray Data)",
                             description="Evaluate a checkpoint or registered model. Metrics go to --json, to "
                             "MLflow when a tracking URI is set (the model's run, else a new run) and, for "
                             "models:/ URIs, onto the version.")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--zeroshot", help="labeled prepared set for zero-shot classification")
    ev.add_argument("--classnames", help="one class name per line, line i is label i (default: the set's manifest)")
    ev.add_argument("--templates", help="file with one prompt per line ({} for the class), or default|simple|imagenet")
    ev.add_argument("--retrieval", help="captioned prepared set for image↔text retrieval")
    ev.add_argument("--linear-probe", nargs=2, metavar=("TRAIN", "TEST"), help="labeled prepared sets")
    ev.add_argument("--shots", type=int, nargs="+", help="few-shot probes, examples per class (default 1 2 4 8 16)")
    ev.add_argument("--json", help="write the metrics here (local path or s3://)")
    ev.set_defaults(handler=_evaluate)

    em = commands.add_parser("embed", parents=[tracking, activation, actors],
                             help="a prepared set's image and caption embeddings → Parquet (Ray Data)",
                             description="Embed every row of a prepared dataset with a checkpoint or registered "
                             "model: OUTPUT/embeddings/*.parquet (key, caption, label, image_embedding, "
                             "text_embedding; L2-normalized fixed-size lists) and OUTPUT/embeddings.json, written "
                             "last, naming the model, the dataset's digest and each file.")
    em.add_argument("model", help=MODEL_HELP)
    em.add_argument("data", help="prepared dataset (the preprocess stage's output)")
    em.add_argument("output", help="new or empty directory or s3:// prefix")
    em.add_argument("--text", action=argparse.BooleanOptionalAction, default=True,
                    help="also embed the captions (default: yes)")
    em.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="of the stored embeddings (float16 halves the files)")
    em.add_argument("--rows-per-file", type=int, default=100_000)
    em.set_defaults(handler=_embed)

    reg = commands.add_parser("register", parents=[tracking, activation],
                              help="checkpoint → MLflow model version, alias challenger")
    reg.add_argument("checkpoint", help="checkpoint directory or s3:// prefix (the train stage's --output)"
                     + OTHER_WEIGHTS)
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--metrics", help="metrics.json from `rayclip evaluate --json`, recorded on the version")
    reg.set_defaults(handler=_register)

    gate = argparse.ArgumentParser(add_help=False)
    gate.add_argument("--metric", default="zeroshot.top1",
                      help="section.metric the gate compares (default zeroshot.top1)")
    pro = commands.add_parser("promote", parents=[tracking, gate],
                              help="move champion to the challenger if the gate passes",
                              description="Compare the challenger (or --version) with the champion on the same eval "
                              "set; champion moves only when the metric drops by at most --max-drop (or, with no "
                              "champion, reaches --floor). Exit status 1 when the gate fails.")
    pro.add_argument("name")
    pro.add_argument("--version", help="the candidate (default: the challenger alias)")
    pro.add_argument("--max-drop", type=float, default=0.005, help="allowed drop (default 0.005 = 0.5 points)")
    pro.add_argument("--floor", type=float, help="what a first champion must reach (default: no floor)")
    pro.add_argument("--force", action="store_true", help="promote even if the gate fails (recorded)")
    pro.set_defaults(handler=_promote)

    rb = commands.add_parser("rollback", parents=[tracking], help="move champion back to the previous champion")
    rb.add_argument("name")
    rb.set_defaults(handler=_rollback)

    mo = commands.add_parser("models", parents=[tracking, gate], help="versions, aliases, metrics and lineage")
    mo.add_argument("name")
    mo.set_defaults(handler=_models)

    ex = commands.add_parser("export", parents=[tracking, activation], help="a checkpoint or registered model → "
                             "Hugging Face transformers or OpenCLIP files",
                             description="Write a checkpoint, a registered model (models:/NAME@ALIAS) or other "
                             "weights as a transformers CLIPModel directory (--to hf; ViT only), which "
                             "CLIPModel.from_pretrained and CLIPProcessor.from_pretrained load, or as an OpenCLIP "
                             "checkpoint file (--to openclip), which open_clip.create_model(NAME, pretrained=FILE) "
                             "loads.")
    ex.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint directory or s3:// prefix"
                    + OTHER_WEIGHTS)
    ex.add_argument("output", help="directory (--to hf) or file (--to openclip): a local path or s3:// URI")
    ex.add_argument("--to", required=True, choices=("hf", "openclip"))
    ex.set_defaults(handler=_export)

    sv = commands.add_parser("serve", parents=[tracking, activation],
                             help="zero-shot HTTP endpoints on Ray Serve, in the foreground",
                             description="Serve a registered model or a checkpoint until interrupted; SIGINT/SIGTERM "
                             "shut Serve and its local Ray down. Bearer auth is on when $RAYCLIP_SERVE_TOKEN is set.")
    sv.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory "
                    "(default models:/clip@champion)" + OTHER_WEIGHTS)
    sv.add_argument("--host", help="default 127.0.0.1")
    sv.add_argument("--port", type=int, help="default 8000")
    sv.add_argument("--config", help="YAML file of serve options (ServeConfig fields, or a `serve deploy` file such "
                    "as deploy/serve_config.yaml); flags override it")
    sv.add_argument("--index", help=INDEX_HELP)
    sv.add_argument("--poll-registry", type=_seconds, metavar="SECONDS",
                    help="check the model's alias this often and roll to the version it names (off by default)")
    sv.set_defaults(handler=_serve)

    de = commands.add_parser("deploy", parents=[tracking, activation],
                             help="deploy the Serve app to a running Ray cluster, or roll it to the model "
                             "version its alias names now (--reload)",
                             description="Without --reload: deploy (or replace) the app from --config/--model on "
                             "the cluster at --address/$RAY_ADDRESS, as `serve deploy` would. With --reload: after "
                             "`rayclip promote` or `rollback`, roll the running app to the version its model alias "
                             "names now (or to --model) in place: the towers load it beside the old one, then the "
                             "ingress switches; no request fails.")
    de.add_argument("--reload", action="store_true", help="roll the running app to its alias's current version")
    de.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory"
                    + OTHER_WEIGHTS)
    de.add_argument("--config", help="YAML file of serve options (ServeConfig fields, or a `serve deploy` file such "
                    "as deploy/serve_config.yaml); flags override it")
    de.add_argument("--host", help="where Serve listens if it is not running yet (default 127.0.0.1)")
    de.add_argument("--port", type=int, help="default 8000")
    de.add_argument("--index", help=INDEX_HELP)
    de.add_argument("--name", default="rayclip", help="the Serve application (default rayclip)")
    de.add_argument("--route-prefix", help="default: the config file's, else /")
    de.add_argument("--address", help="the Ray cluster (default $RAY_ADDRESS, else the local one)")
    de.add_argument("--poll-registry", type=_seconds, metavar="SECONDS",
                    help="then stay in the foreground, checking the model's alias this often and rolling the app to "
                    "the version it names (e.g. as a Ray job beside `serve deploy`)")
    de.set_defaults(handler=_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:  # a flag a stage's config refused: what and why, not pydantic's report
        problems = "; ".join(f"{'.'.join(map(str, error['loc']))}{': ' if error['loc'] else ''}"
                             f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())
        print(f"rayclip {args.command}: error: {redact(problems)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"rayclip {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:  # a config file or a --set value
        print(f"rayclip {args.command}: error: not valid YAML: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_mlflow_error(exc):
            raise
        print(f"rayclip {args.command}: error: {failure(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; Ray's handlers turn SIGTERM and Ctrl-C into exits
        print(f"rayclip {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def entry() -> int:
    """The console script. Each stage prints its own progress, so Ray Data's (progress bars, INFO
    lines per dataset execution) gives way, here and in the workers of a local Ray this process
    starts (they inherit the environment); either variable set by the user wins."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return main()


if __name__ == "__main__":
    sys.exit(entry())
