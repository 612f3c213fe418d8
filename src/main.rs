//! The `concertim-billing` command line: parses arguments, sets up logging, calls the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use concertim_billing::{
    app::App,
    billing::{killbill, Backend},
    bus::{self, topology},
    config::{BackendKind, SecretUrl, Settings},
    dlq, replay,
    store::Store,
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
    ///
    /// Serves /healthz, /readyz and /metrics on http.listen, and, when api.listen is set, the
    /// billing API Concertim calls (credits, invoices, orders; tokens signed with
    /// api.jwt_secret_file): see `config check` and the README's "The billing API".
    #[command(
        after_help = "Examples:\n  concertim-billing run --ledger /var/lib/concertim-billing/ledger.db\n  CONCERTIM_BILLING_AMQP_URL=amqps://billing:…@rabbit:5671/openstack concertim-billing run --config /etc/concertim-billing.toml"
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
        after_help = "Examples:\n  concertim-billing replay fixtures/\n  concertim-billing replay --report json fixtures/nova-legacy\n  concertim-billing replay --ledger billing.db captured.jsonl\n  concertim-billing replay --ledger billing.db          # show what the ledger holds"
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
        /// Bill running instances up to this time (RFC 3339); ended ones are billed to their
        /// end. Default: the latest notification time in the input, so a replay is exact
        /// whatever the order of its messages.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        as_of: Option<concertim_billing::event::Timestamp>,
        /// After replaying into the embedded ledger, look up each project's account in the
        /// KillBill of the [killbill] section, read-only, and say what `run` would do: use the
        /// account keyed by the project, adopt the one the Python service made (by its
        /// project_cloud_id or openstack_project_id field), or create one. The take-over check.
        #[arg(long, conflicts_with_all = ["apply", "publish"])]
        check_accounts: bool,
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
    /// Validate and print the effective configuration (the file layered over the embedded
    /// defaults, then the environment), secrets redacted.
    ///
    /// Fails (exit status 2) on what would silently bill nothing: a metered meter Ceilometer
    /// does not emit, or a plan or unit the catalog does not declare.
    #[command(
        after_help = "Examples:\n  concertim-billing --config /etc/concertim-billing.toml config check\n  concertim-billing --config site.toml config check --catalog site-catalog.xml"
    )]
    Check {
        /// The KillBill catalog the plans and units are checked against (the one `killbill
        /// bootstrap --catalog` uploads); the bundled deploy/killbill/catalog.xml by default.
        #[arg(long, value_name = "FILE")]
        catalog: Option<PathBuf>,
    },
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
    let dlq = error.chain().find_map(|e| e.downcast_ref::<dlq::DlqError>());
    let bus = error.chain().find_map(|e| e.downcast_ref::<bus::BusError>()).or_else(|| dlq.and_then(|e| e.bus()));
    if error.downcast_ref::<UsageError>().is_some() || dlq.is_some_and(dlq::DlqError::is_usage) {
        1
    } else if matches!(bus, Some(bus::BusError::Unreachable { .. })) {
        4
    } else {
        2
    }
}

/// What a valid configuration would silently not bill: metered meters Ceilometer does not emit,
/// and plans or units the catalog (`catalog`, or the bundled one) does not declare. HostBill
/// maps plans to its own products, which its section's validation checks.
fn traps(settings: &Settings, catalog_xml: &str, catalog: Option<&std::path::Path>) -> Vec<String> {
    let mut traps = settings.warnings();
    if settings.billing.backend != BackendKind::Hostbill {
        let gaps = killbill::configured_gaps(&settings.billing, catalog_xml);
        if !gaps.is_empty() {
            let which = catalog.map_or_else(
                || "the bundled catalog (deploy/killbill/catalog.xml)".to_owned(),
                |p| format!("the catalog {}", p.display()),
            );
            traps.push(format!(
                "{which} does not declare {}, which the configuration bills: that usage would be refused by KillBill and priced at nothing. Name plans the catalog has (billing.default_plan, billing.plans, billing.resources), or check against the catalog you upload (config check --catalog FILE; killbill bootstrap --catalog FILE)",
                gaps.join(", ")
            ));
        }
    }
    traps
}

/// Resolves the names `projects.managed_by` gives (`user_name`, `role_name`) through Keystone,
/// once: the notifications carry ids.
async fn resolve_scope(settings: &mut Settings) -> anyhow::Result<()> {
    let Some(managed) = settings.projects.managed_by.as_ref().filter(|m| m.needs_names()) else { return Ok(()) };
    let keystone = settings.keystone.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "projects.managed_by names its user or role by name, which needs the [keystone] section to resolve; or give their ids (user, role)"
        )
    })?;
    let resolved = concertim_billing::keystone::Keystone::new(keystone)?
        .resolve(managed)
        .await
        .context("resolving projects.managed_by through Keystone")?;
    tracing::info!(user = ?resolved.user, role = ?resolved.role, "projects.managed_by resolved through Keystone");
    settings.projects.managed_by = Some(resolved);
    Ok(())
}

/// How many projects the managed scope admits now, as Keystone lists them.
async fn scope_size(
    settings: &Settings,
    keystone: concertim_billing::config::KeystoneSettings,
) -> anyhow::Result<usize> {
    let client = concertim_billing::keystone::Keystone::new(keystone)?;
    Ok(client.managed_projects(&settings.projects).await?.len())
}

/// The billing API in one line of `config check`.
fn describe_api(settings: &Settings) -> String {
    let api = &settings.api;
    if api.listen.is_empty() {
        return "off (set api.listen, e.g. \"127.0.0.1:42356\", and api.jwt_secret_file to serve it)".to_owned();
    }
    let mut line = format!(
        "POST {} on http://{} (tokens HS256 with api.jwt_secret; orders refused at or below {} in credits)",
        concertim_billing::api::ROUTES.join(" "),
        api.listen,
        settings.billing.credit_threshold
    );
    if settings.billing.backend == BackendKind::Hostbill {
        line.push_str("; with HostBill every route answers 501");
    }
    if !api.listen.starts_with("127.") && !api.listen.starts_with("[::1]") && !api.listen.starts_with("localhost") {
        line.push_str("\n# WARNING: api.listen is not loopback and the API speaks plain HTTP: serve it behind a TLS proxy reachable by Concertim only");
    }
    line
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

/// `println!` that ends the process quietly (exit 0) when stdout is closed, as `config check |
/// head` closes it, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            closed_stdout(&e);
        }
    }};
}

/// `print!` as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            closed_stdout(&e);
        }
    }};
}

/// A reader that went away (a pipe closed) wants nothing more: exit 0. Anything else is a
/// failure to say what was asked.
fn closed_stdout(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
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
            let published = runtime()?.block_on(replay::publish(&settings, &paths, |line| eprintln!("{line}")))?;
            outln!("published {} messages to {}; {} not published", published.sent, settings.bus.url, published.failed);
            Ok(if published.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        Command::Replay { paths, ledger, report, apply, as_of, check_accounts, .. } => {
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
            if check_accounts && (settings.killbill.is_none() || !matches!(report, ReportFormat::Text)) {
                return Err(UsageError(
                    "--check-accounts looks the projects up in KillBill: give --config with a [killbill] section, and the text report"
                        .into(),
                )
                .into());
            }
            let check = check_accounts.then(|| settings.killbill.clone()).flatten();
            replay_locally(settings, &paths, ledger, report, apply, as_of, check)
        }
        Command::Run { ledger, ledger_in_memory } => {
            // Said before anything is opened or created.
            Backend::check_for_service(&settings, ledger.is_some(), ledger_in_memory)?;
            let described = Backend::describe(&settings, ledger.as_deref());
            tracing::info!(backend = %described, "billing backend");
            for warning in settings.warnings() {
                tracing::warn!("{warning}");
            }
            runtime()?.block_on(async move {
                let mut settings = settings;
                resolve_scope(&mut settings).await?;
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                // --ledger FILE keeps the ledger and the timelines in one embedded store.
                let store = open_state(&settings, ledger.as_deref(), ledger_in_memory).await?;
                let ledger_store = ledger.is_some().then(|| std::sync::Arc::clone(&store));
                let backend = Backend::for_service(&settings, ledger_store, ledger_in_memory).await?;
                let keystone = settings.keystone.clone().filter(|_| settings.projects.managed_scope());
                let app = App::new(settings, backend).with_store(store);
                if let Some(keystone) = keystone {
                    // What the bus said before this service listened is Keystone's to say.
                    let client = concertim_billing::keystone::Keystone::new(keystone)?;
                    match app.admit_from_keystone(&client).await {
                        Ok(n) => tracing::info!(admitted = n, "managed scope read from Keystone"),
                        Err(e) => tracing::warn!(
                            error.message = %e,
                            "cannot read the managed scope from Keystone: projects are admitted as the bus says"
                        ),
                    }
                }
                app.listen(described).await?.listen_api().await?.run(shutdown).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Show } => {
            out!("{}", describe_topology(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Declare } => {
            let absent = runtime()?.block_on(topology::declare_all(&settings))?;
            for binding in absent {
                let why = bus::BusError::UpstreamAbsent { exchange: binding.exchange.clone() };
                eprintln!("note: not bound to {} ({}): {why}", binding.exchange, binding.routing_key);
            }
            out!("declared on {}:\n{}", settings.bus.url, describe_topology(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Killbill { action: KillBillAction::Bootstrap { catalog } } => {
            let url = settings.killbill.as_ref().map(|kb| kb.url.clone()).unwrap_or_default();
            let done = runtime()?.block_on(killbill::bootstrap_configured(&settings, catalog.as_deref()))?;
            outln!(
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
            outln!("captured {written} messages into {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { action: ConfigAction::Check { catalog } } => {
            let xml = match &catalog {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| UsageError(format!("cannot read the catalog {}: {e}", path.display())))?,
                None => killbill::CATALOG_XML.to_owned(),
            };
            let mut traps = traps(&settings, &xml, catalog.as_deref());
            let mut scope_line = None;
            // A managed scope that admits no project bills nothing: Keystone says whether it does.
            if let Some(keystone) = settings.keystone.clone().filter(|_| settings.projects.managed_scope()) {
                match runtime()?.block_on(scope_size(&settings, keystone)) {
                    Ok(0) => traps.push(
                        "no project is in the managed scope (Keystone lists no role assignment of projects.managed_by, and no project name matches projects.include_names): nothing would be billed. Check the user and role ids (`openstack role assignment list --user <id> --role <id>`) and the patterns"
                            .to_owned(),
                    ),
                    Ok(n) => scope_line = Some(format!("# managed scope: {n} project(s) admitted now, as Keystone lists them")),
                    Err(e) => eprintln!("warning: cannot read the managed scope from Keystone ({e}): not checked"),
                }
            }
            if !traps.is_empty() {
                for trap in &traps {
                    eprintln!("error: {trap}");
                }
                eprintln!(
                    "error: the configuration is valid but would not bill what it says ({} problem(s) above)",
                    traps.len()
                );
                return Ok(ExitCode::from(2));
            }
            outln!("# effective configuration: valid");
            if let Some(line) = scope_line {
                outln!("{line}");
            }
            outln!("# billing backend: {}", Backend::describe(&settings, None));
            outln!("# billing API: {}", describe_api(&settings));
            if settings.concertim.as_ref().is_some_and(|c| !c.tls_verify) {
                outln!("# WARNING: concertim.tls_verify = false: Concertim's certificate is not verified, so anyone in between can read its password and token");
            }
            out!("{}", settings.to_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn dead_letters(settings: &Settings, action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { filters, json } => {
            let letters = dlq::list(settings, &filters.selector()).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                out!("{}", dlq::table(&letters));
            }
        }
        DlqAction::Show { id, no_redact } => out!("{}", dlq::show(settings, &id, no_redact).await?),
        DlqAction::Export { out, filters, no_redact } => {
            let file = concertim_billing::redact::create_private(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let exported = dlq::export(settings, &filters.selector(), &mut writer, no_redact)
                .await
                .with_context(|| format!("export to {}", out.display()))?;
            outln!("exported {exported} dead letter(s) to {}", out.display());
        }
        DlqAction::Requeue { filters, all, to_queue, to_original_exchange, dry_run } => {
            let action = if to_original_exchange {
                dlq::Action::RequeueToOriginal
            } else if to_queue {
                dlq::Action::RequeueToQueue
            } else {
                dlq::Action::Requeue
            };
            let selector = filters.selector();
            if to_original_exchange && (all || !selector.is_empty()) {
                eprintln!(
                    "warning: --to-original-exchange republishes to the upstream exchanges: every queue bound there \
                     (OpenStack's notifications.info, Ceilometer, CloudKitty) gets these messages again"
                );
            }
            let moved = dlq::requeue(settings, &selector, all, action, dry_run).await?;
            if dry_run {
                out!("{}", dlq::table(&moved.done));
                outln!("(dry run: nothing moved)");
            } else {
                outln!("requeued {} dead letter(s)", moved.done.len());
                for (letter, why) in &moved.stuck {
                    eprintln!("not requeued, still in the dead-letter queue: {}: {why}", letter.id);
                }
                if !moved.stuck.is_empty() {
                    return Ok(ExitCode::from(3));
                }
            }
        }
        DlqAction::Purge { filters, all, yes } => {
            let purged = dlq::purge(settings, &filters.selector(), all, yes).await?;
            outln!("purged {} dead letter(s)", purged.done.len());
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

/// Reads an RFC 3339 time from the command line.
fn parse_time(text: &str) -> Result<concertim_billing::event::Timestamp, String> {
    concertim_billing::event::Timestamp::parse(text).map_err(|e| format!("{e}; e.g. 2025-03-31T00:00:00Z"))
}

/// The state store `run` keeps its timelines in: the --ledger FILE, PostgreSQL when
/// `state.url` is set, else the SQLite file `state.path`; in memory with --ledger-in-memory (a
/// trial run).
async fn open_state(
    settings: &Settings,
    ledger: Option<&std::path::Path>,
    in_memory: bool,
) -> anyhow::Result<std::sync::Arc<Store>> {
    let store = match (ledger, &settings.state.url, in_memory) {
        (_, _, true) => Store::in_memory().await?,
        (Some(file), _, false) => Store::open(&file.to_string_lossy()).await?,
        (None, Some(url), false) => Store::open(url.expose()).await?,
        (None, None, false) => Store::open(&settings.state.path).await?,
    };
    tracing::info!(store = %store.describe(), "state store");
    Ok(std::sync::Arc::new(store))
}

fn replay_locally(
    settings: Settings,
    paths: &[PathBuf],
    ledger: Option<PathBuf>,
    report: ReportFormat,
    apply: bool,
    as_of: Option<concertim_billing::event::Timestamp>,
    check_accounts: Option<concertim_billing::config::KillBillSettings>,
) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let output = runtime
        .block_on(replay::local(settings, paths, ledger.as_deref(), apply, as_of, |line| eprintln!("{line}")))?;
    match report {
        ReportFormat::Text => out!("{}", output.to_text()),
        ReportFormat::Json => outln!("{}", output.to_json()),
    }
    let mut ok = output.all_ok();
    if let Some(kb) = check_accounts {
        let url = kb.url.clone();
        let client = concertim_billing::billing::KillBill::new(kb)?;
        outln!("\nKillBill accounts at {url} (read-only check: what `run` would do)");
        outln!("  {:<34} {:<8} {}", "project", "action", "account");
        for account in &output.accounts {
            let project = &account.project_id;
            let (action, detail) = match runtime.block_on(client.account_preview(project)) {
                Ok(killbill::AccountPreview::Keyed(id)) => ("use", id),
                Ok(killbill::AccountPreview::Adopt { account_id, fields }) => {
                    ("adopt", format!("{account_id} (the Python service's; by {})", fields.join(", ")))
                }
                Ok(killbill::AccountPreview::Create) => ("create", "(a new account keyed by the project)".to_owned()),
                Err(e) => {
                    ok = false;
                    ("error", e.to_string())
                }
            };
            outln!("  {:<34} {:<8} {}", project.as_str(), action, detail);
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(3) })
}
