//! The `concertim-billing` command line: parses arguments, sets up logging, calls the library.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use concertim_billing::{
    billing::{Backend, KillBill, Ledger},
    bus::{self, publish::Publisher, topology},
    config::{BackendKind, SecretUrl, Settings},
    executor::Executor,
    replay::{self, fixture, Counts, Report},
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

    #[command(subcommand)]
    command: Command,
}

/// Where the broker is.
#[derive(Args)]
struct Broker {
    /// Broker URL (amqp://user:password@host:5672/vhost or amqps://…); overrides bus.url.
    /// Prefer the environment variable, which keeps the password out of `ps`.
    #[arg(long, env = "CONCERTIM_BILLING_AMQP_URL", value_name = "URL", hide_env_values = true)]
    amqp_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume OpenStack notifications from RabbitMQ until SIGTERM or Ctrl-C, then finish the
    /// messages in flight and exit 0.
    ///
    /// Declares its own queues first (see `topology show`); never touches OpenStack's shared
    /// notifications.info queue. With no billing backend configured, billing goes to the
    /// embedded ledger: in memory, or in FILE with --ledger (written before each message is
    /// acknowledged).
    Run {
        #[command(flatten)]
        broker: Broker,
        /// Keep the ledger in this file.
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
    },
    /// Declare or describe this service's queues, exchanges and bindings.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Validate the configuration and print the effective values (secrets redacted).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Prepare the KillBill server of the [killbill] section.
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
    /// several replays add up and a second replay of the same messages changes nothing.
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
        /// confirms) instead of replaying them locally, to exercise a running deployment.
        #[arg(long)]
        publish: bool,
        #[command(flatten)]
        broker: Broker,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare every queue, exchange and binding (safe to repeat).
    Declare {
        #[command(flatten)]
        broker: Broker,
    },
    /// Print the topology the configuration describes.
    Show,
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
enum ReportFormat {
    /// Tables for people.
    Text,
    /// One JSON object: counts, accounts, subscriptions, usage.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs each message's outcome; the operator tools only their problems.
    let default_level = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    let mut set_url = |broker: &Broker| {
        if let Some(url) = &broker.amqp_url {
            settings.bus.url = SecretUrl::new(url.clone());
        }
    };
    match &cli.command {
        Command::Run { broker, .. }
        | Command::Replay { broker, .. }
        | Command::Topology { action: TopologyAction::Declare { broker } } => set_url(broker),
        _ => {}
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
        Command::Replay { paths, ledger, report, .. } => replay_locally(settings, &paths, ledger, report),
        Command::Run { ledger, .. } => {
            let backend = backend(&settings, ledger.as_deref())?;
            let bus = settings.bus.clone();
            let executor = Arc::new(Executor::new(settings, backend));
            runtime()?.block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                bus::run(&bus, executor, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Show } => {
            print!("{}", topology::describe(&settings.bus));
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Declare { .. } } => {
            runtime()?.block_on(async {
                let connection = bus::connect(&settings.bus.url, "concertim-billing topology").await?;
                let channel = connection.create_channel().await.context("cannot open a channel")?;
                topology::declare(&channel, &settings.bus).await?;
                let _ = connection.close(200, "done".into()).await;
                anyhow::Ok(())
            })?;
            print!("declared on {}:\n{}", settings.bus.url, topology::describe(&settings.bus));
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
        Command::Config { action: ConfigAction::Check } => {
            println!("# effective configuration: valid");
            print!("{}", settings.to_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The configured billing backend; `ledger_file` keeps the embedded ledger in a file.
fn backend(settings: &Settings, ledger_file: Option<&std::path::Path>) -> anyhow::Result<Backend> {
    Ok(match settings.billing.backend {
        BackendKind::Ledger => Backend::Ledger(match ledger_file {
            Some(path) => Ledger::open(path)?,
            None => Ledger::in_memory(),
        }),
        BackendKind::Killbill => {
            if ledger_file.is_some() {
                anyhow::bail!("--ledger keeps the embedded ledger, but billing.backend is \"killbill\"");
            }
            let kb = settings.killbill.clone().context("billing.backend = \"killbill\" needs a [killbill] section")?;
            Backend::KillBill(KillBill::new(kb)?)
        }
    })
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
    let (mut sent, mut failed) = (0, 0);
    for (position, delivery) in fixture::read_all(&files) {
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
        match publisher.publish(exchange, &delivery).await {
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
) -> anyhow::Result<ExitCode> {
    if paths.is_empty() && ledger.is_none() {
        anyhow::bail!("nothing to replay: give fixture PATHS, or --ledger FILE to show a stored ledger (see --help)");
    }
    let files = fixture::collect_files(paths)?;
    let executor = Executor::new(settings.clone(), backend(&settings, ledger.as_deref())?);
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
            eprintln!("note: billing went to KillBill; its accounts, subscriptions and usage are not listed here");
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
