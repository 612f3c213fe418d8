//! The `concertim-billing` command line: parses arguments, sets up logging, calls the library.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use concertim_billing::{
    billing::{Backend, KillBill},
    bus::{self, publish::Publisher, topology},
    config::{BackendKind, SecretUrl, Settings},
    dlq,
    executor::Executor,
    fixture,
    replay::{self, Counts, Report},
};
use tokio_util::sync::CancellationToken;

/// Turns OpenStack notifications (Keystone, Nova, Ceilometer) into billing: one account per
/// project, one subscription per instance, usage recorded exactly once.
#[derive(Parser)]
#[command(name = "concertim-billing", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default is used: every project
    /// billed, every flavor on `openstack-standard-monthly`, vCPU/memory/disk/instance hours.
    #[arg(long, global = true, env = "CONCERTIM_BILLING_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Broker URL (amqp://user:password@host:5672/vhost or amqps://…) for the commands that talk
    /// to the broker; overrides bus.url. Prefer the environment variable, which keeps the
    /// password out of `ps`.
    #[arg(long, global = true, env = "CONCERTIM_BILLING_AMQP_URL", value_name = "URL", hide_env_values = true)]
    amqp_url: Option<String>,

    /// Log format on stderr: human text, or one JSON object per line for collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CONCERTIM_BILLING_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume OpenStack notifications from RabbitMQ until SIGTERM or Ctrl-C, then finish the
    /// messages in flight and exit 0.
    ///
    /// Declares its own queues first (see `topology show`); never touches OpenStack's shared
    /// notifications.info queue. Billing goes to the configured backend (billing.backend:
    /// KillBill or HostBill). The embedded ledger is used only when asked for: in FILE with
    /// --ledger (written before each message is acknowledged), or in memory with
    /// --ledger-in-memory (lost at exit). Without either, a configuration that names no backend
    /// is refused: a replica started without its config would otherwise bill into memory and
    /// acknowledge its share of the messages.
    #[command(
        after_help = "Examples:\n  concertim-billing run --ledger /var/lib/concertim-billing/ledger.json\n  CONCERTIM_BILLING_AMQP_URL=amqps://billing:…@rabbit:5671/openstack concertim-billing run --config /etc/concertim-billing.toml"
    )]
    Run {
        /// Bill into the embedded ledger, kept in this file.
        #[arg(long, value_name = "FILE", conflicts_with = "ledger_in_memory")]
        ledger: Option<PathBuf>,
        /// Bill into an embedded ledger in memory, lost at exit (to try the service out).
        #[arg(long)]
        ledger_in_memory: bool,
    },
    /// Declare or describe this service's queues, exchanges and bindings.
    #[command(
        after_help = "Examples:\n  concertim-billing topology show\n  concertim-billing --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f topology declare"
    )]
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Validate the configuration and print the effective values (secrets redacted).
    #[command(after_help = "Example:\n  concertim-billing --config /etc/concertim-billing.toml config check")]
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Inspect, export, requeue and purge dead letters.
    ///
    /// Reading never removes or reorders messages: they are fetched and returned in place.
    #[command(
        after_help = "Examples:\n  concertim-billing dlq list --class invalid\n  concertim-billing dlq show 3f2a9c1b04de\n  concertim-billing dlq export --out failed.jsonl --older-than 1h\n  concertim-billing dlq requeue --event-type metering --dry-run\n  concertim-billing dlq requeue --all\n  concertim-billing dlq purge --id 3f2a9c1b04de"
    )]
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Tap the live bus into a fixture file that `replay` reads.
    ///
    /// Uses its own exclusive, auto-deleted queue bound like the main queue: it takes a copy of
    /// every message and steals nothing. Credential fields are redacted unless --no-redact.
    #[command(
        after_help = "Examples:\n  concertim-billing capture --out bus.jsonl --duration 10m\n  concertim-billing capture --out 100.jsonl --count 100"
    )]
    Capture {
        /// The fixture file to write (JSON Lines).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this long (30s, 15m, 2h).
        #[arg(long, value_parser = parse_age)]
        duration: Option<std::time::Duration>,
        /// Keep credential fields (_context_auth_token, passwords) as they are.
        #[arg(long)]
        no_redact: bool,
    },
    /// Prepare the KillBill server of the [killbill] section.
    #[command(after_help = "Example:\n  concertim-billing --config /etc/concertim-billing.toml killbill bootstrap")]
    Killbill {
        #[command(subcommand)]
        action: KillBillAction,
    },
    /// Feed captured notifications through decode → plan → billing, with no broker, and show
    /// what would be billed.
    ///
    /// PATHS are files or folders (searched recursively for .json and .jsonl files, in name
    /// order). Each .jsonl line is a captured delivery
    /// {"exchange","routing_key","properties","redelivered","body"}; a .json file holds one
    /// delivery, an oslo envelope, or a bare notification.
    ///
    /// Billing goes to the embedded ledger: in memory, or in FILE with --ledger, so that
    /// several replays add up and a second replay of the same messages changes nothing. It goes
    /// to the billing application the configuration names (billing.backend: KillBill or
    /// HostBill) only with --apply, which says where first: replay never writes to a real
    /// billing application unless told to.
    ///
    /// Exit status: 0 when every message was processed or ignored, 3 when any was invalid or
    /// failed (each is listed on stderr with its file, line and reason), 2 on a usage error.
    #[command(
        after_help = "Examples:\n  concertim-billing replay fixtures/\n  concertim-billing replay --report json fixtures/nova-legacy\n  concertim-billing replay --ledger billing.json captured.jsonl\n  concertim-billing replay --ledger billing.json          # show what the ledger holds"
    )]
    Replay {
        /// Fixture files or folders.
        #[arg(value_name = "PATHS")]
        paths: Vec<PathBuf>,
        /// Keep the ledger in this file (created when missing; written atomically at the end).
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
        /// Report format on stdout.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        report: ReportFormat,
        /// Publish the fixtures to the broker (each to its exchange and routing key, with
        /// confirms) instead of replaying them locally, to exercise a running deployment. An
        /// absent exchange is declared as an oslo publisher would (topic, durable as
        /// bus.upstream_durable, never auto-deleted): with amqp_auto_delete, let OpenStack
        /// declare it first.
        #[arg(long)]
        publish: bool,
        /// Bill into the billing application the configuration names (billing.backend) instead
        /// of the embedded ledger.
        #[arg(long, conflicts_with_all = ["ledger", "publish"])]
        apply: bool,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare every queue, exchange and binding (safe to repeat).
    Declare,
    /// Print the topology the configuration describes.
    Show,
}

/// Which dead letters a command applies to.
#[derive(Args, Default)]
struct Filters {
    /// Only the dead letter with this id (or id prefix); repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// Only this event type (e.g. compute.instance.create.end).
    #[arg(long)]
    event_type: Option<String>,
    /// Only this class: invalid, transient, permanent, or broker.
    #[arg(long)]
    class: Option<String>,
    /// Only reasons containing this text.
    #[arg(long, value_name = "TEXT")]
    reason_contains: Option<String>,
    /// Only messages that failed longer ago than this (30s, 15m, 2h, 7d).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    older_than: Option<std::time::Duration>,
    /// At most this many messages.
    #[arg(long)]
    limit: Option<usize>,
}

impl Filters {
    fn selector(&self) -> dlq::Selector {
        // An empty id (a prefix of every id) would select everything without --all.
        let ids = self.ids.iter().filter(|id| !id.trim().is_empty()).cloned().collect();
        dlq::Selector {
            ids,
            event_type: self.event_type.clone(),
            class: self.class.clone(),
            reason_contains: self.reason_contains.clone(),
            older_than: self.older_than,
            limit: self.limit,
        }
    }
}

/// The topology the configuration describes, Concertim's queues included when configured.
fn describe_topology(settings: &Settings) -> String {
    let mut text = topology::describe(&settings.bus);
    if let Some(concertim) = &settings.concertim {
        text.push_str(&topology::describe_concertim(&settings.bus, concertim));
    }
    text
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    dlq::parse_age(text)
}

#[derive(Subcommand)]
enum DlqAction {
    /// A table of the dead letters: id, age, event type, class, attempts, original route, reason.
    List {
        #[command(flatten)]
        filters: Filters,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter: headers, properties, the decoded notification, the error.
    Show {
        /// Its id (or an unambiguous prefix), as `list` shows.
        id: String,
        /// Show credential fields as they are.
        #[arg(long)]
        no_redact: bool,
    },
    /// Write the selected dead letters to a fixture file that `replay` reads (non-destructive).
    Export {
        /// The fixture file (JSON Lines).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        filters: Filters,
        /// Keep credential fields as they are.
        #[arg(long)]
        no_redact: bool,
    },
    /// Send the selected dead letters back to this service's own queue they failed in (with
    /// publisher confirms), then remove them from the dead-letter queue.
    ///
    /// A notification goes to the main queue, a Concertim update to the Concertim queue: never
    /// to the upstream exchange, where every other consumer (Ceilometer, CloudKitty) would get
    /// it again, unless --to-original-exchange says so.
    Requeue {
        #[command(flatten)]
        filters: Filters,
        /// Every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
        /// Send them to our main queue (the default for notifications; kept for scripts).
        #[arg(long, conflicts_with = "to_original_exchange")]
        to_queue: bool,
        /// Send them back to their original upstream exchange and routing key instead: every
        /// queue bound there gets a copy, OpenStack's own consumers included.
        #[arg(long)]
        to_original_exchange: bool,
        /// Only list what would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the selected dead letters.
    Purge {
        #[command(flatten)]
        filters: Filters,
        /// Every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
        /// Confirm deleting more than one message.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum KillBillAction {
    /// Create the tenant (api_key/api_secret) when absent and upload the catalog, unless a
    /// catalog with the same effectiveDate is already there. Safe to repeat.
    Bootstrap {
        /// Catalog XML to upload instead of the bundled deploy/killbill/catalog.xml.
        #[arg(long, value_name = "FILE")]
        catalog: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate and print the effective configuration.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    /// Tables for people.
    Text,
    /// One JSON object: counts, accounts, subscriptions, usage.
    Json,
}

/// A mistake in the command line: exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Exit statuses: 0 success, 1 usage error, 2 configuration or input error, 3 some messages
/// invalid or failed, 4 broker unreachable.
fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        1
    } else if error
        .chain()
        .any(|e| matches!(e.downcast_ref::<bus::BusError>(), Some(bus::BusError::Unreachable { .. })))
    {
        4
    } else {
        2
    }
}

/// The error and its causes, each said once (some errors repeat their source in their text).
fn causes(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    // The service logs each message's outcome; the operator tools only their problems.
    // lapin logs channel closures it reports to us as errors anyway; the tools say it once.
    let default_level = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn,lapin=off" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(concertim_billing::telemetry::text_log_fields())
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", causes(&e));
            ExitCode::from(exit_status(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(url) = &cli.amqp_url {
        // Checked like bus.url in a file: a typo is a clear error, not a connection attempt.
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(UsageError(format!(
                "--amqp-url {} must start with amqp:// or amqps://",
                SecretUrl::new(url.clone())
            ))
            .into());
        }
        settings.bus.url = SecretUrl::new(url.clone());
    }
    match cli.command {
        Command::Replay { paths, ledger, report, publish: true, .. } => {
            if ledger.is_some() || !matches!(report, ReportFormat::Text) {
                anyhow::bail!(
                    "--publish sends the fixtures to the broker; --ledger and --report apply to local replays only"
                );
            }
            runtime()?.block_on(publish(&settings, &paths))
        }
        Command::Replay { paths, ledger, report, apply, .. } => {
            for warning in settings.warnings() {
                eprintln!("warning: {warning}");
            }
            if apply && settings.billing.backend == BackendKind::Ledger {
                return Err(UsageError(
                    "--apply sends billing to the configured billing application, but billing.backend is the embedded ledger: \
                     give --config naming KillBill or HostBill, or leave --apply out"
                        .into(),
                )
                .into());
            }
            if paths.is_empty() && ledger.is_none() {
                return Err(UsageError(
                    "nothing to replay: give fixture PATHS, or --ledger FILE to show a stored ledger (see --help)"
                        .into(),
                )
                .into());
            }
            replay_locally(settings, &paths, ledger, report, apply)
        }
        Command::Run { ledger, ledger_in_memory } => {
            if settings.billing.backend == BackendKind::Ledger && ledger.is_none() && !ledger_in_memory {
                anyhow::bail!(
                    "no billing backend is configured (billing.backend is \"ledger\", the embedded default): \
                     this replica would bill into memory and lose it. Set billing.backend with its [killbill] or \
                     [hostbill] section (--config FILE), or ask for the embedded ledger with --ledger FILE \
                     (or --ledger-in-memory to try the service out)"
                );
            }
            let backend = Backend::from_settings(&settings, ledger.as_deref())?;
            let described = Backend::describe(&settings, ledger.as_deref());
            tracing::info!(backend = %described, "billing backend");
            for warning in settings.warnings() {
                tracing::warn!("{warning}");
            }
            let listen = settings.http.listen.clone();
            let app = concertim_billing::app::App::new(settings, backend);
            runtime()?.block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                let app = if listen.is_empty() {
                    app
                } else {
                    let addr: std::net::SocketAddr = listen.parse().context("http.listen")?;
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (http.listen; \"\" disables it)"))?;
                    tracing::info!(%addr, "serving /healthz /readyz /metrics");
                    app.with_http(listener, concertim_billing::telemetry::install_prometheus(), described)
                };
                app.run(shutdown).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Show } => {
            print!("{}", describe_topology(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Declare } => {
            runtime()?.block_on(async {
                let connection = bus::connect(&settings.bus.url, "concertim-billing topology").await?;
                let channel = connection.create_channel().await.context("cannot open a channel")?;
                topology::declare(&channel, &settings.bus).await?;
                if let Some(concertim) = &settings.concertim {
                    topology::declare_concertim(&channel, &settings.bus, concertim).await?;
                }
                for absent in topology::bind_upstream(&settings.bus).await? {
                    eprintln!(
                        "note: not bound to {} ({}): {}",
                        absent.exchange,
                        absent.routing_key,
                        concertim_billing::bus::BusError::UpstreamAbsent { exchange: absent.exchange.clone() }
                    );
                }
                let _ = connection.close(200, "done".into()).await;
                anyhow::Ok(())
            })?;
            print!("declared on {}:\n{}", settings.bus.url, describe_topology(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Killbill { action: KillBillAction::Bootstrap { catalog } } => {
            let kb =
                settings.killbill.clone().context("killbill bootstrap needs a [killbill] section in the config")?;
            let xml = match &catalog {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
                }
                None => concertim_billing::billing::killbill::CATALOG_XML.to_owned(),
            };
            // Usage in a unit the catalog lacks is accepted by KillBill and never invoiced; a plan it
            // lacks refuses every subscription. Both are refused here, before anything is sent.
            let units = settings.billing.meters.values().map(|m| m.unit.as_str());
            let plans = std::iter::once(settings.billing.default_plan.as_str())
                .chain(settings.billing.plans.values().map(|p| p.as_str()));
            let gaps = concertim_billing::billing::killbill::catalog_gaps(&xml, units, plans);
            if !gaps.is_empty() {
                anyhow::bail!(
                    "the catalog{} does not declare {}, which the configuration bills: add them to the catalog \
                     (and bump its effectiveDate) or change [billing.meters]/[billing.plans]",
                    catalog.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default(),
                    gaps.join(", ")
                );
            }
            let created_by = kb.created_by.clone();
            let url = kb.url.clone();
            let done = runtime()?.block_on(async { KillBill::new(kb)?.bootstrap(&xml, &created_by).await })?;
            println!(
                "KillBill at {url}: tenant {}, catalog {}",
                if done.tenant_created { "created" } else { "already there" },
                if done.catalog_uploaded { "uploaded" } else { "already there" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action, .. } => runtime()?.block_on(dead_letters(&settings, action)),
        Command::Capture { out, count, duration, no_redact, .. } => {
            if count.is_none() && duration.is_none() && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("note: no --count or --duration: capturing until interrupted");
            }
            let file = concertim_billing::redact::create_private(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let written = runtime()?.block_on(async {
                let stop = CancellationToken::new();
                tokio::spawn(stop_on_signal(stop.clone()));
                let until = concertim_billing::capture::Until { count, duration };
                concertim_billing::capture::capture(&settings.bus, &mut writer, until, no_redact, stop, |n| {
                    if terminal && n > 0 {
                        eprint!("\rcaptured {n} messages");
                    }
                })
                .await
            })?;
            if terminal {
                eprintln!();
            }
            println!("captured {written} messages into {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { action: ConfigAction::Check } => {
            println!("# effective configuration: valid");
            for warning in settings.warnings() {
                println!("# WARNING: {warning}");
            }
            println!("# billing backend: {}", Backend::describe(&settings, None));
            if settings.concertim.as_ref().is_some_and(|c| !c.tls_verify) {
                println!("# WARNING: concertim.tls_verify = false: Concertim's certificate is not verified, so anyone in between can read its password and token");
            }
            print!("{}", settings.to_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn dead_letters(settings: &Settings, action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { filters, json } => {
            let letters = dlq::list(settings, &filters.selector()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", dlq::table(&letters));
            }
        }
        DlqAction::Show { id, no_redact } => {
            let selector = dlq::Selector { ids: vec![id.clone()], ..dlq::Selector::default() };
            // Only the first match's body is kept: the others are only counted.
            let mut first: Option<String> = None;
            let mut distinct = std::collections::BTreeSet::new();
            dlq::scan(settings, &selector, |letter| {
                if first.is_none() {
                    first = Some(letter.describe(settings, no_redact));
                }
                distinct.insert(letter.meta.id);
                Ok::<(), concertim_billing::bus::BusError>(())
            })
            .await?;
            match (first, distinct.len()) {
                (None, _) => {
                    return Err(
                        UsageError(format!("no dead letter has an id starting with {id:?} (see dlq list)")).into()
                    )
                }
                (Some(first), 1) => print!("{first}"),
                _ => {
                    return Err(UsageError(format!(
                        "{id:?} matches {} dead letters: give more of the id",
                        distinct.len()
                    ))
                    .into())
                }
            }
        }
        DlqAction::Export { out, filters, no_redact } => {
            let file = concertim_billing::redact::create_private(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            // Written as read: one body in memory at a time.
            let exported = dlq::scan(settings, &filters.selector(), |letter| {
                writeln!(writer, "{}", fixture::to_line(&letter.to_fixture(no_redact)))
                    .with_context(|| format!("cannot write {}", out.display()))
            })
            .await?;
            writer.flush().with_context(|| format!("cannot write {}", out.display()))?;
            println!("exported {exported} dead letter(s) to {}", out.display());
        }
        DlqAction::Requeue { filters, all, to_queue, to_original_exchange, dry_run } => {
            let selector = filters.selector();
            if selector.is_empty() && !all {
                return Err(UsageError("requeue what? give --id or a filter, or --all".into()).into());
            }
            let action = if to_original_exchange {
                eprintln!(
                    "warning: --to-original-exchange republishes to the upstream exchanges: every queue bound there \
                     (OpenStack's notifications.info, Ceilometer, CloudKitty) gets these messages again"
                );
                dlq::Action::RequeueToOriginal
            } else if to_queue {
                dlq::Action::RequeueToQueue
            } else {
                dlq::Action::Requeue
            };
            let moved = dlq::apply(settings, &selector, action, dry_run).await?;
            if dry_run {
                print!("{}", dlq::table(&moved.done));
                println!("(dry run: nothing moved)");
            } else {
                println!("requeued {} dead letter(s)", moved.done.len());
                for (letter, why) in &moved.stuck {
                    eprintln!("not requeued, still in the dead-letter queue: {}: {why}", letter.id);
                }
                if !moved.stuck.is_empty() {
                    return Ok(ExitCode::from(3));
                }
            }
        }
        DlqAction::Purge { filters, all, yes } => {
            let selector = filters.selector();
            if selector.is_empty() && !all {
                return Err(UsageError("purge what? give --id or a filter, or --all".into()).into());
            }
            let selected = dlq::list(settings, &selector).await?;
            if selected.len() > 1 && !yes {
                return Err(UsageError(format!(
                    "this would delete {} dead letters: add --yes to confirm (or see them first with dlq list)",
                    selected.len()
                ))
                .into());
            }
            // Exactly what was counted: letters that arrived since are not selected.
            let exact = dlq::Selector {
                ids: selected.iter().map(|d| d.id.clone()).collect(),
                limit: Some(selected.len()),
                ..dlq::Selector::default()
            };
            let purged = if selected.is_empty() {
                dlq::Moved::default()
            } else {
                dlq::apply(settings, &exact, dlq::Action::Purge, false).await?
            };
            println!("purged {} dead letter(s)", purged.done.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: finishing the messages in flight");
    shutdown.cancel();
}

async fn publish(settings: &Settings, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    if paths.is_empty() {
        anyhow::bail!("nothing to publish: give fixture PATHS");
    }
    let files = fixture::collect_files(paths)?;
    let mut publisher = Publisher::connect(&settings.bus.url).await?;
    // Standing in for OpenStack's publishers, which declare their exchanges before publishing.
    let mut declared = std::collections::BTreeSet::new();
    for (_, delivery) in files.iter().flat_map(|f| fixture::read_all(std::slice::from_ref(f))) {
        if let Some(exchange) = delivery.ok().and_then(|d| d.exchange) {
            if declared.insert(exchange.clone()) {
                publisher.ensure_upstream(&exchange, settings.bus.upstream_durable).await?;
            }
        }
    }
    // A service started just before waits for those exchanges and then binds its queue: a
    // message with no queue bound yet is tried again for a while rather than lost.
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut sent, mut failed) = (0, 0);
    for (position, delivery) in files.iter().flat_map(|f| fixture::read_all(std::slice::from_ref(f))) {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) => {
                eprintln!("{position}: not published: {e}");
                failed += 1;
                continue;
            }
        };
        let Some(exchange) = delivery.exchange.as_deref() else {
            eprintln!("{position}: skipped: the fixture names no exchange");
            failed += 1;
            continue;
        };
        let mut result = publisher.publish(exchange, &delivery).await;
        while matches!(result, Err(bus::BusError::NotConfirmed { .. })) && std::time::Instant::now() < patience {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            result = publisher.publish(exchange, &delivery).await;
        }
        match result {
            Ok(()) => sent += 1,
            Err(e) => {
                eprintln!("{position}: not published: {e}");
                failed += 1;
            }
        }
    }
    println!("published {sent} messages to {}; {failed} not published", settings.bus.url);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

fn replay_locally(
    settings: Settings,
    paths: &[PathBuf],
    ledger: Option<PathBuf>,
    report: ReportFormat,
    apply: bool,
) -> anyhow::Result<ExitCode> {
    let files = fixture::collect_files(paths)?;
    let backend = if apply {
        eprintln!("applying to {}", Backend::describe(&settings, None));
        Backend::from_settings(&settings, None)?
    } else {
        if settings.billing.backend != BackendKind::Ledger {
            eprintln!(
                "note: replaying into the embedded ledger, not into {} (--apply sends it there)",
                Backend::describe(&settings, None)
            );
        }
        Backend::embedded(ledger.as_deref())?
    };
    // The ledger file is written once, after the last message (see the persist below).
    let executor = Executor::new(settings, backend).committing_at_the_end();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let counts: Counts = runtime.block_on(replay::replay_files(&executor, &files, |problem| {
        eprintln!("{problem}");
    }));
    let snapshot = match executor.billing().ledger() {
        Some(ledger) => {
            ledger.persist()?;
            ledger.snapshot()
        }
        None => {
            eprintln!("note: billing went to the billing application; its accounts, subscriptions and usage are not listed here");
            Default::default()
        }
    };
    let output = Report::new(counts, snapshot);
    match report {
        ReportFormat::Text => print!("{}", output.to_text()),
        ReportFormat::Json => println!("{}", output.to_json()),
    }
    Ok(if counts.all_ok() { ExitCode::SUCCESS } else { ExitCode::from(3) })
}
