"""lora-workers: Kafka-driven workers serving many LoRA adapters on one vLLM base model.

Every failure the user can fix (a bad flag, a missing file, no broker address, a cluster that
cannot be reached or refuses the credentials) ends with one readable line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog
from confluent_kafka import KafkaException
from pydantic import ValidationError

from workers.adapters.compose import CompositionMethod
from workers.bulk.plan import MergeMode
from workers.core.config import ConfigError, PipelineConfig, Settings, load_catalog, load_pipelines
from workers.core.config.sources import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    LoadedSettings,
    effective_rows,
)
from workers.core.contracts import ADAPTER_NAME_PATTERN, VERSION_PATTERN, contract_schemas
from workers.kafka.clients import KafkaConnection, KafkaUnavailable, describe, probe
from workers.kafka.sinks import DeliveryFailed

if TYPE_CHECKING:
    from workers.kafka.publish import PublishReport
    from workers.kafka.report import ResultsReport

EXIT_USAGE = 2
EXIT_FAILURE = 1
MAX_ERRORS_SHOWN = 20


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Appends an argument's default to its help, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and "default" not in help_text and action.option_strings:
            help_text += " (default: %(default)s)"
        return help_text


def _build_parser() -> argparse.ArgumentParser:
    def command_parser(
        parent: argparse._SubParsersAction, name: str, help_text: str
    ) -> argparse.ArgumentParser:
        return parent.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpWithDefaults
        )

    parser = _OneLineParser(
        prog="lora-workers",
        description=__doc__.splitlines()[0],
        formatter_class=_HelpWithDefaults,
        epilog=_SETTINGS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version_of()}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG_NAME} if "
        "there is one)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        help="Kafka brokers, host:port[,...] (default: $KAFKA_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument(
        "--pipelines",
        type=Path,
        help="directory of pipeline YAML files (default: the repository's pipelines/)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="structured log level on stderr",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_OneLineParser, metavar="COMMAND"
    )

    run = command_parser(commands, "run", "consume jobs and write results")
    run.add_argument("--group-id", help="Kafka consumer group (default: lora-workers)")
    run.add_argument("--catalog", type=Path, help=_CATALOG_HELP)
    run.add_argument(
        "--max-jobs", type=_positive_int, help="exit after N finished messages (default: never)"
    )
    run.add_argument(
        "--idle-exit",
        type=_positive_float,
        metavar="SECONDS",
        help="exit after this long with no work (default: never)",
    )
    run.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics on this port (default: no metrics server)",
    )

    bulk = command_parser(
        commands, "bulk", "run a file of jobs into a Parquet dataset, without Kafka"
    )
    bulk.add_argument(
        "--pipeline", help="serve every row with this task's pipeline (default: each row's task)"
    )
    bulk.add_argument("--input", required=True, type=Path, help="jobs as .jsonl or .parquet")
    bulk.add_argument(
        "--output",
        required=True,
        type=Path,
        help="the Parquet dataset directory; with --format openai, a .jsonl file gets OpenAI "
        "batch output lines",
    )
    bulk.add_argument(
        "--format",
        choices=["jobs", "openai"],
        default="jobs",
        help="the input's lines: project jobs, or OpenAI Batch API requests (default: jobs)",
    )
    bulk.add_argument(
        "--rows-per-file", type=_positive_int, default=10_000, help="rows per Parquet file"
    )
    bulk.add_argument(
        "--row-group-size", type=_positive_int, default=10_000, help="rows per Parquet row group"
    )
    bulk.add_argument(
        "--run-id",
        type=_run_id,
        help="resume the run of this id: skip its job_ids already in --output "
        "(default: the input file's sha256, so the same file resumes)",
    )
    bulk.add_argument(
        "--merge",
        choices=[m.value for m in MergeMode],
        default=MergeMode.AUTO.value,
        help="serve adapters merged into the base weights: auto (where the measured costs say "
        "it pays), never, or always (default: auto)",
    )
    bulk.add_argument(
        "--summary-json", type=Path, help="also write the run's summary to this file, as JSON"
    )
    bulk.add_argument("--catalog", type=Path, help=_CATALOG_HELP)
    bulk.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (rows, pipelines, adapters, the tier of each) and exit: nothing "
        "is generated or written",
    )

    publish = command_parser(commands, "publish", "publish jobs from a file to a topic")
    destination = publish.add_mutually_exclusive_group(required=True)
    destination.add_argument("--topic", help="the input topic, e.g. jobs.classify")
    destination.add_argument(
        "--by-task",
        action="store_true",
        help="each job to its task's input topic (a mixed-task file); a job of no pipeline's "
        "task is not published, and named by its line number",
    )
    publish.add_argument("file", help="a .jsonl or .parquet file of jobs; - for JSONL on stdin")

    topics = command_parser(commands, "topics", "manage the pipelines' topics")
    topic_commands = topics.add_subparsers(
        dest="topics_command", required=True, parser_class=_OneLineParser, metavar="COMMAND"
    )
    create = command_parser(
        topic_commands, "create", "create input, result, dead-letter and adapter topics"
    )
    create.add_argument(
        "--partitions", type=_positive_int, default=3, help="partitions per job/result topic"
    )
    create.add_argument(
        "--replication-factor", type=_positive_int, default=1, help="replicas per partition"
    )
    create.add_argument(
        "--acls",
        action="store_true",
        help="also print and create the worker, publisher and adapter-admin ACLs "
        "(docs/security.md); needs a principal allowed to create ACLs",
    )

    results = command_parser(commands, "results", "print result counts by task, adapter and status")
    results.add_argument("--json", action="store_true", help="as one JSON document")

    get = command_parser(
        commands,
        "get",
        "print one job's result or dead letter; exit 0 for a result, 1 for a dead letter or "
        "none found",
    )
    get.add_argument("job_id", metavar="JOB_ID", help="the job's job_id")
    get.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if no answer is written yet, wait this long for one",
    )
    get.add_argument("--json", action="store_true", help="print the record as JSON")

    command_parser(
        commands,
        "check",
        "validate settings, pipelines, catalog and model offline (no broker, no engine); "
        "exit 0 when all pass, 1 otherwise",
    )

    config = command_parser(commands, "config", "the effective configuration")
    config_commands = config.add_subparsers(
        dest="config_command", required=True, parser_class=_OneLineParser, metavar="COMMAND"
    )
    command_parser(config_commands, "show", "print every setting, its value and where it came from")

    init = command_parser(
        commands,
        "init",
        "make a project folder: configuration file, pipelines/, schemas/, and the demo "
        "model and adapters with their catalog",
    )
    init.add_argument("directory", type=Path, help="a new or empty folder")

    top = command_parser(commands, "top", "a live view of one worker, from its metrics endpoint")
    top.add_argument(
        "--url", default="http://localhost:9400/metrics", help="the worker's metrics endpoint"
    )
    top.add_argument(
        "--interval", type=_positive_float, default=2.0, metavar="SECONDS", help="refresh period"
    )
    top.add_argument("--once", action="store_true", help="print one table and exit")

    adapters = command_parser(
        commands, "adapters", "announce, shadow, promote, compose and list adapter versions"
    )
    adapter_commands = adapters.add_subparsers(
        dest="adapters_command", required=True, parser_class=_OneLineParser, metavar="COMMAND"
    )
    announce = command_parser(adapter_commands, "publish", "announce a new adapter version")
    announce.add_argument("name", help="the adapter's name, as jobs and pipelines route to it")
    announce.add_argument("--version", required=True, help="a new version label, e.g. v2")
    announce.add_argument("--path", required=True, type=Path, help="the adapter directory")
    announce.add_argument("--base-model", help="default: the catalog's base model")
    _add_share_arguments(announce)
    announce.add_argument(
        "--tenants", type=_tenants, help="comma-separated allow list (default: all tenants)"
    )
    announce.add_argument("--hot", action="store_true", help="pin in the engine's adapter slots")
    announce.add_argument("--catalog", type=Path, help=_CATALOG_HELP)

    promote = command_parser(
        adapter_commands, "promote", "make a shadow (or canary) version serve traffic"
    )
    promote.add_argument("name", help="the adapter's name")
    promote.add_argument("version", help="its shadow or canary version")
    promote.add_argument(
        "--weight",
        type=_weight,
        default=1.0,
        help="share of traffic it serves, in (0, 1]; the other versions share the rest",
    )
    promote.add_argument("--catalog", type=Path, help=_CATALOG_HELP)

    compose = command_parser(
        adapter_commands, "compose", "build an adapter from weighted others (PEFT) and publish it"
    )
    compose.add_argument("name", type=_adapter_name, help="the new adapter's name")
    compose.add_argument(
        "--from",
        dest="sources",
        required=True,
        type=_sources,
        help="NAME[@VERSION]:WEIGHT,... e.g. billing-reply:0.7,customer-tone:0.3",
    )
    compose.add_argument(
        "--version", required=True, type=_version, help="the composed version's label"
    )
    compose.add_argument(
        "--method",
        choices=[method.value for method in CompositionMethod],
        default="linear",
        help="linear: equal ranks, weights applied to A and B; cat: exact weighted sum, ranks "
        "add up; ties: trim, elect sign, merge",
    )
    compose.add_argument(
        "--density", type=_weight, default=0.5, help="share of weights ties keeps, in (0, 1]"
    )
    compose.add_argument(
        "--out",
        type=Path,
        help="directory to write it to, under an allowed root "
        "(default: <first allowed root>/composed/NAME/VERSION)",
    )
    _add_share_arguments(compose)
    compose.add_argument("--catalog", type=Path, help=_CATALOG_HELP)
    command_parser(adapter_commands, "list", "what the adapter-update topic holds, with status")

    schemas = command_parser(commands, "schemas", "contract schema files")
    schema_commands = schemas.add_subparsers(
        dest="schemas_command", required=True, parser_class=_OneLineParser, metavar="COMMAND"
    )
    export = command_parser(
        schema_commands, "export", "write schemas/*.schema.json from the contract models"
    )
    export.add_argument("--out", type=Path, default=Path("schemas"), help="output directory")
    return parser


_CATALOG_HELP = "adapter catalog YAML (default: the configuration's `catalog`)"
_SETTINGS_HELP = (
    "Settings come from, highest first: flags, LORA_WORKERS_* environment variables (nested "
    "with __, e.g. LORA_WORKERS_ENGINE__MAX_LORAS=4), the configuration file, defaults. "
    "`lora-workers config show` prints each setting and its source; docs/configuration.md "
    "lists them all."
)


def _version_of() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-workers")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]{1,64}", text):
        raise argparse.ArgumentTypeError(f"use 1-64 letters, digits, '_' or '.', got {text!r}")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_share_arguments(parser: argparse.ArgumentParser) -> None:
    share = parser.add_mutually_exclusive_group()
    share.add_argument(
        "--weight", type=_weight, default=1.0, help="share of traffic for this version, in (0, 1]"
    )
    share.add_argument(
        "--shadow",
        type=_weight,
        metavar="SHARE",
        help="serve no one: run this share of the adapter's jobs on it too, in (0, 1], and "
        "compare the answers on adapters.evaluations",
    )


def _adapter_name(text: str) -> str:
    if not re.fullmatch(ADAPTER_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"use 1-64 letters, digits, '.', '_' or '-', got {text!r}")
    return text


def _version(text: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"use 1-32 letters, digits, '.', '_' or '-', got {text!r}")
    return text


def _sources(text: str) -> list[tuple[str, float]]:
    sources: list[tuple[str, float]] = []
    for part in text.split(","):
        name, sep, weight = part.strip().rpartition(":")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT, got {part.strip()!r}")
        try:
            value = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"weight of {name} is not a number: {weight!r}"
            ) from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"weight of {name} must be positive, got {weight}")
        sources.append((name, value))
    return sources


def _weight(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _tenants(text: str) -> list[str]:
    tenants = [t.strip() for t in text.split(",") if t.strip()]
    if not tenants:
        raise argparse.ArgumentTypeError("needs at least one tenant")
    return tenants


def _settings(args: argparse.Namespace) -> Settings:
    return _loaded_settings(args).settings


def _loaded_settings(args: argparse.Namespace) -> LoadedSettings:
    overrides: dict[str, Any] = {}
    if args.bootstrap_servers:
        overrides["bootstrap_servers"] = args.bootstrap_servers
    if args.pipelines:
        overrides["pipelines_dir"] = args.pipelines
    if getattr(args, "group_id", None):
        overrides["group_id"] = args.group_id
    if getattr(args, "catalog", None):
        overrides["catalog"] = args.catalog
    return Settings.load(overrides, args.config)


def _kafka(settings: Settings) -> KafkaConnection:
    """The cluster's connection, probed first: one line within seconds if it cannot be used,
    rather than a client retrying (and librdkafka complaining) for a minute."""
    kafka = KafkaConnection.from_settings(settings)
    probe(kafka)
    return kafka


def _pipelines(settings: Settings) -> dict[str, PipelineConfig]:
    return load_pipelines(settings.pipelines_dir)


def _cmd_run(args: argparse.Namespace) -> int:
    from workers.runtime import run_worker

    settings = _settings(args)
    summary = run_worker(
        settings,
        max_jobs=args.max_jobs,
        idle_exit_s=args.idle_exit,
        metrics_port=args.metrics_port,
    )
    print(json.dumps({"finished": summary.answered, "output_tokens": summary.output_tokens}))
    return 0


def _cmd_bulk(args: argparse.Namespace) -> int:
    from workers.bulk.runner import BulkOptions, print_summary
    from workers.bulk.tiers import print_phases, summary_document
    from workers.runtime import bulk_run

    if args.summary_json is not None and not args.summary_json.parent.is_dir():
        raise ConfigError(f"--summary-json {args.summary_json}: no such directory")
    if args.format == "openai":
        from workers.bulk.openai import OpenAIBatchRun

        if args.pipeline is not None:
            raise ConfigError("--format openai runs on built-in pipelines: drop --pipeline")
        batch = OpenAIBatchRun(
            _settings(args),
            args.input,
            args.output,
            MergeMode(args.merge),
            args.run_id,
            args.rows_per_file,
            args.row_group_size,
        )
        if args.dry_run:
            with tempfile.TemporaryDirectory() as jobs_dir:  # a dry run leaves nothing behind
                _print_plan(batch.bulk(Path(jobs_dir)).dry_run(), args.merge)
            return 0
        summary = batch.run()
        if summary is None:  # no servable line: the output holds only error lines
            return 0
    else:
        options = BulkOptions(
            args.input,
            args.output,
            args.pipeline,
            args.rows_per_file,
            args.row_group_size,
            args.run_id,
        )
        run = bulk_run(_settings(args), options, MergeMode(args.merge))
        if args.dry_run:
            _print_plan(run.dry_run(), args.merge)
            return 0
        summary = run.run()
    print_summary(summary)
    print_phases(summary)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary_document(summary), indent=2) + "\n")
    return 0


def _print_plan(dry: Any, mode: str) -> None:
    """A bulk run's plan (`workers.bulk.tiers.DryRun`), as plain lines."""
    from workers.core.contracts import ServedBy

    found, plan = dry.survey, dry.plan
    to_serve = sum(d.jobs for d in found.demand.values())
    print(
        f"bulk plan, run {dry.run_id}, merge {mode}: {found.rows_read} rows read, "
        f"{found.skipped} already written, {to_serve} to serve, "
        f"{len(found.unroutable)} unroutable (written as error rows)"
    )
    tiers = {
        name: phase.served_by.value
        for phase in plan.phases
        for name in phase.adapters
        if phase.served_by is ServedBy.MERGED or name in found.demand
    }
    print(f"{'adapter':<32} {'jobs':>8} {'token budget':>13}  tier")
    for (name, demand), label in zip(found.demand.items(), dry.labels, strict=True):
        tier = tiers.get(name, ServedBy.LORA.value)
        print(f"{label:<32} {demand.jobs:>8} {demand.token_budget:>13}  {tier}")
    others = ", ".join(f"{m.value} {s:.0f} s" for m, s in plan.estimates.items())
    print(f"estimated {plan.estimate_s:.0f} s ({others}); nothing was generated or written")


def _cmd_publish(args: argparse.Namespace) -> int:
    from workers.bulk.jobfiles import count_rows, numbered_lines, numbered_rows
    from workers.client.lines import rows_by_task
    from workers.kafka.publish import publish_rows

    settings = _settings(args)
    settings.require_bootstrap()
    path = None if args.file == "-" else Path(args.file)
    if path is not None and not path.is_file():
        raise ConfigError(f"cannot read {args.file}: no such file")
    # Bytes, not text: a line that is not UTF-8 is published as it is, for the worker to
    # dead-letter with its reason, instead of ending the whole publish.
    rows = numbered_lines(sys.stdin.buffer) if path is None else numbered_rows(path)
    total = None if path is None else count_rows(path)
    if args.by_task:
        topics = {task: str(p.input_topic) for task, p in _pipelines(settings).items()}
        by_topic, unrouted = rows_by_task(rows, topics)
        _print_failed_lines(unrouted)
        kafka = _kafka(settings)
        failed = len(unrouted)
        for topic, topic_rows in sorted(by_topic.items()):
            failed += _publish_report(
                topic, publish_rows(kafka, topic, topic_rows, len(topic_rows))
            )
        return EXIT_FAILURE if failed else 0
    _warn_if_unread(settings, args.topic)
    report = publish_rows(_kafka(settings), args.topic, rows, total)
    return EXIT_FAILURE if _publish_report(args.topic, report) else 0


def _publish_report(topic: str, report: PublishReport) -> int:
    """Print what one topic's publish did; the number of lines that failed."""
    _print_failed_lines(report.errors)
    print(
        f"published {report.written} jobs to {topic}"
        + (f", {report.failed} failed" if report.failed else "")
        + (f" ({report.unkeyed} without a job_id key)" if report.unkeyed else "")
    )
    return report.failed


# How far back `get` listens before reading the topics to their end: covers answers committed
# while the topics are read.
WAIT_LOOKBACK_S = 60.0


def _warn_if_unread(settings: Settings, topic: str) -> None:
    """One stderr line when no pipeline reads `topic` (a typo publishes into the void)."""
    try:
        read = {p.input_topic for p in _pipelines(settings).values()}
    except ConfigError:
        return  # no pipelines here to compare with: publishing elsewhere is legitimate
    if topic not in read:
        print(f"lora-workers: warning: no pipeline reads topic {topic}", file=sys.stderr)


def _print_failed_lines(errors: Sequence[tuple[int | None, str]]) -> None:
    """One stderr line per distinct reason: a broker refusing the topic fails every line for
    the same reason, which one line says; a bad line is named by its number."""
    lines_by_reason: dict[str, list[int | None]] = {}
    for line, reason in errors:
        lines_by_reason.setdefault(reason, []).append(line)
    for shown, (reason, lines) in enumerate(lines_by_reason.items()):
        if shown == MAX_ERRORS_SHOWN:
            print(f"lora-workers: ... {len(lines_by_reason) - shown} more reasons", file=sys.stderr)
            break
        numbers = [str(line) for line in lines if line]
        if not numbers:
            where = "publish"
        elif len(numbers) == 1:
            where = f"line {numbers[0]}"
        else:
            listed = ", ".join(numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            where = f"{len(numbers)} lines ({listed})"
        print(f"lora-workers: {where}: {reason}", file=sys.stderr)


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from workers.kafka.topics import create_topics, pipeline_topics

    settings = _settings(args)
    pipelines = _pipelines(settings)
    topics = pipeline_topics(settings, pipelines, args.partitions)
    outcome = create_topics(_kafka(settings), topics, args.replication_factor)
    for topic, state in sorted(outcome.items()):
        print(f"{state:8} {topic}")
    if args.acls:
        from workers.kafka.acls import acl_set, apply_acls

        grants = acl_set(settings, pipelines)
        for grant in grants:
            print(f"acl      {grant.line()}")
        apply_acls(settings, grants)
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from workers.kafka.report import collect, print_report

    settings = _settings(args)
    pipelines = _pipelines(settings).values()
    report = collect(
        _kafka(settings),
        [p.result_topic for p in pipelines],
        [p.dlq_topic for p in pipelines] + [settings.unknown_task_dlq],
    )
    if args.json:
        print(json.dumps(_report_document(report), indent=2))
    else:
        print_report(report)
    return 0


def _report_document(report: ResultsReport) -> dict[str, Any]:
    return {
        "results": [
            {"task": task, "adapter": adapter, "status": status, "jobs": jobs}
            for (task, adapter, status), jobs in sorted(report.counts.items())
        ],
        "dead_letters": [
            {"topic": topic, "code": code, "messages": messages}
            for (topic, code), messages in sorted(report.dead_letters.items())
        ],
    }


def _cmd_get(args: argparse.Namespace) -> int:
    from workers.client import Client, JobFailed, find_answer

    settings = _settings(args)
    kafka = _kafka(settings)
    # The client listens first, then the topics are read to their end: an answer committed
    # meanwhile is in one or the other.
    with Client(settings, lookback_s=WAIT_LOOKBACK_S) as client:
        outcome = find_answer(kafka, client.answer_topics(), args.job_id)
        if outcome is None and args.wait > 0:
            try:
                outcome = client.get(args.job_id, args.wait)
            except JobFailed as failed:
                outcome = failed
            except TimeoutError:
                pass
    if outcome is None:
        print(f"lora-workers: no answer for job {args.job_id}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(outcome, JobFailed):
        failure = {"job_id": outcome.job_id, "code": outcome.code, "message": outcome.message}
        if args.json:
            print(json.dumps({"dead_letter": {**failure, "topic": outcome.topic}}))
        else:
            print(f"dead letter on {outcome.topic}: {outcome.code}: {outcome.message}")
        return EXIT_FAILURE
    if args.json:
        print(outcome.model_dump_json())
    else:
        adapter = outcome.adapter and f"{outcome.adapter.name}@{outcome.adapter.version}"
        print(f"{outcome.job_id} {outcome.task} {outcome.status} {adapter or 'base'}")
        print(outcome.raw_output)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    # Plain lines, never wrapped: easy to read, grep and diff.
    loaded = _loaded_settings(args)
    rows = effective_rows(loaded)
    print(f"# configuration file: {loaded.config_file or 'none'}")
    name_width = max(len(name) for name, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 60)
    for name, value, origin in rows:
        print(f"{name:<{name_width}}  {value:<{value_width}}  # {origin}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from workers.check import run_checks

    loaded = _loaded_settings(args)
    rows = run_checks(loaded.settings)
    table = Table(title=f"lora-workers check ({loaded.config_file or 'no configuration file'})")
    for column in ("area", "item", "", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        mark = "[green]ok[/green]" if row.ok else "[red]FAIL[/red]"
        table.add_row(row.area, row.item, mark, row.detail)
    Console(width=max(shutil.get_terminal_size().columns, 120)).print(table)
    failed = sum(not row.ok for row in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return EXIT_FAILURE if failed else 0


def _cmd_init(args: argparse.Namespace) -> int:
    from workers.scaffold import init_project

    written = init_project(args.directory)
    print(f"wrote {len(written)} files to {args.directory}:")
    for name in ("lora-workers.yaml", "pipelines/", "schemas/", "models/catalog.yaml"):
        print(f"  {args.directory / name}")
    print(f"next: cd {args.directory} && lora-workers check")
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from workers.top import run_top

    run_top(args.url, args.interval, args.once)
    return 0


def _cmd_schemas_export(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, document in contract_schemas().items():
        (args.out / filename).write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out / filename}")
    return 0


def _cmd_adapters(args: argparse.Namespace) -> int:
    from workers.adapters.admin import list_adapters, promote_version, publish_version
    from workers.core.errors import AdapterRejected

    settings = _settings(args)
    _kafka(settings)  # every adapters command reads the topics first
    if args.adapters_command == "list":
        _print_adapters(list_adapters(settings))
        return 0
    if args.adapters_command == "promote":
        state = promote_version(settings, name=args.name, version=args.version, weight=args.weight)
    else:
        path = args.path if args.adapters_command == "publish" else _composed(args, settings)
        try:
            state = publish_version(
                settings,
                name=args.name,
                version=args.version,
                path=path,
                base_model=getattr(args, "base_model", None)
                or load_catalog(settings.catalog).base_model,
                weight=args.weight,
                tenants=getattr(args, "tenants", None),
                hot=getattr(args, "hot", False),
                max_lora_rank=settings.engine.max_lora_rank,
                shadow=args.shadow,
            )
        except AdapterRejected as rejection:
            if args.adapters_command == "compose":  # nothing published: nothing left behind
                shutil.rmtree(path, ignore_errors=True)
            raise ConfigError(f"adapter rejected: {rejection}") from rejection
    shares = ", ".join(f"{v.version}: {v.weight:.0%}" for v in state.versions)
    if state.shadow is not None:
        shares += f"; shadow {state.shadow.version}: {state.shadow.share:.0%} of jobs"
    print(f"published {state.name} ({shares}) to {settings.adapters.updates_topic}")
    return 0


def _composed(args: argparse.Namespace, settings: Settings) -> Path:
    """Build the composed adapter (`adapters compose`); its directory."""
    from workers.adapters.admin import source_paths
    from workers.adapters.compose import CompositionError, compose_adapter
    from workers.engine.model import resolve_model

    out = args.out or settings.adapters.allowed_roots[0] / "composed" / args.name / args.version
    try:
        path = compose_adapter(
            source_paths(settings, args.sources),
            method=CompositionMethod(args.method),
            base_model_dir=resolve_model(settings.engine.model),
            out_dir=out,
            density=args.density,
        )
    except CompositionError as exc:
        raise ConfigError(f"cannot compose {args.name}: {exc}") from exc
    print(f"composed {args.name}@{args.version} ({args.method}) in {path}")
    return path


def _print_adapters(listings: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Adapters on the update topic")
    for column in ("adapter", "version", "weight", "tenants", "hot", "status", "shadow evaluation"):
        table.add_column(column)
    for listing in listings:
        state = listing.state
        tenants = ",".join(state.tenants) if state.tenants else "all"
        rows = [(spec.version, f"{spec.weight:.0%}") for spec in state.versions]
        if state.shadow is not None:
            rows.append((state.shadow.version, f"shadow {state.shadow.share:.0%}"))
        for version, weight in rows:
            status = listing.statuses.get(version)
            described = "-" if status is None else f"{status.state} ({status.worker})"
            if status is not None and status.code:
                described += f" {status.code}"
            evaluation = ""
            shadowed = listing.shadow_status
            if state.shadow is not None and version == state.shadow.version and shadowed:
                summary = shadowed.evaluation
                assert summary is not None
                evaluation = (
                    f"{summary.jobs} jobs: text {summary.identical_text:.0%}, output "
                    f"{summary.identical_output:.0%} identical; valid {summary.serving_valid:.0%}"
                    f" vs {summary.shadow_valid:.0%}; {summary.serving_latency_ms:.0f} vs "
                    f"{summary.shadow_latency_ms:.0f} ms ({shadowed.worker})"
                )
            table.add_row(
                state.name, version, weight, tenants, str(state.hot), described, evaluation
            )
    Console().print(table)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "publish": _cmd_publish,
    "bulk": _cmd_bulk,
    "topics": _cmd_topics_create,
    "results": _cmd_results,
    "get": _cmd_get,
    "top": _cmd_top,
    "adapters": _cmd_adapters,
    "schemas": _cmd_schemas_export,
    "config": _cmd_config_show,
    "check": _cmd_check,
    "init": _cmd_init,
}


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = _build_parser().parse_args(argv)
    from workers.logs import configure_logging

    try:
        configure_logging(args.log_level)
        code = _COMMANDS[args.command](args)
    except (ConfigError, ValidationError) as exc:
        print(f"lora-workers: error: {_first_line(exc)}", file=sys.stderr)
        code = EXIT_USAGE
    except KafkaUnavailable as exc:
        print(f"lora-workers: error: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except DeliveryFailed as exc:  # e.g. the result and dead-letter topics both denied
        print(f"lora-workers: error: cannot write answers: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KafkaException as exc:
        print(f"lora-workers: kafka error: {describe(exc.args[0])}", file=sys.stderr)
        code = EXIT_FAILURE
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as exc:  # a port in use, an unwritable output path, a missing file
        print(f"lora-workers: error: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # the traceback to the log, one line to the operator
        structlog.get_logger(__name__).exception("fatal")
        print(f"lora-workers: fatal: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.exit(code)
