//! The `tollgate` command line: `serve`, `migrate` and the admin commands.
//!
//! Admin commands write the same ledger a running gateway uses, through the same operations as
//! the `/admin` routes, and bump the shared cache epoch, which running gateways read every
//! 100 ms.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::{self, App};
use crate::billing::store::verify_books;
use crate::config::Config;
use crate::domain::time::parse_duration;
use crate::domain::{AccountId, Credits};
use crate::ledger::{Bucket, EntryType, GrantRequest};
use crate::metering::pricing::PriceTable;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "OpenAI-compatible gateway that meters every token in credits"
)]
pub struct Cli {
    /// The gateway's config file.
    #[arg(
        long,
        global = true,
        default_value = "config/tollgate.toml",
        env = "TOLLGATE_CONFIG"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// JWTs for trying the gateway out.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Grant credits and show balances.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Gateway API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Pricing files.
    #[command(subcommand)]
    Pricing(PricingCommand),
    /// Ledger checks.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Serve the built-in mock OpenAI upstream on its own, for benchmarks and trying clients
    /// (needs no config).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an HS256 JWT signed with the configured secret.
    Mint {
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. `30m`, `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// Role claim (e.g. `admin`).
        #[arg(long)]
        role: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add (or with a negative adjustment, take) credits.
    Grant {
        account: String,
        /// Decimal credits, e.g. `100` or `2.5`.
        #[arg(allow_hyphen_values = true)]
        amount: Credits,
        /// bonus, purchase, adjustment or refund.
        #[arg(long = "type", default_value = "bonus")]
        entry_type: String,
        #[arg(long, default_value = "granted from the command line")]
        description: String,
        /// Idempotency key: a repeated grant with the same reference changes nothing.
        #[arg(long)]
        reference: Option<String>,
        /// The granted credits expire after this long, e.g. `30d`.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Show an account's balance.
    Balance { account: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (printed once; only its hash is stored).
    Create {
        account: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Most credits this key may spend in total.
        #[arg(long)]
        spend_limit: Option<Credits>,
        /// Comma-separated model names or patterns this key may use.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
    },
    /// Revoke a key by id (`key_…`).
    Revoke { key_id: String },
    /// List an account's keys.
    List { account: String },
}

#[derive(Debug, Subcommand)]
pub enum PricingCommand {
    /// Validate a pricing file without starting the gateway.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Check that every account's entries add up to its balance; exit 1 on any mismatch.
    Verify,
}

fn account(raw: &str) -> anyhow::Result<AccountId> {
    AccountId::parse(raw).map_err(|e| anyhow::anyhow!("account `{raw}`: {e}"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Pricing(PricingCommand::Check { file }) = &cli.command {
        return Ok(match PriceTable::load(file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        });
    }
    if let Command::MockUpstream { listen } = &cli.command {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!(
            "mock upstream listening on http://{}/v1",
            listener.local_addr()?
        );
        tokio::select! {
            served = crate::mock::serve(listener) => served.context("serving")?,
            () = shutdown_signal() => {}
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Serve => {
            config.check_secrets().map_err(anyhow::Error::msg)?;
            crate::telemetry::init(config.server.log_format);
            let app = App::build(config).await?;
            tracing::info!(address = %app.local_addr()?, "tollgate listening");
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Migrate => {
            app::open_ledger(&config).await?;
            println!("migrations applied to {}", config.database.url);
        }
        Command::Token(TokenCommand::Mint { sub, ttl, role }) => {
            // The rules `serve` applies: a token it would refuse is not minted.
            config.check_secrets().map_err(anyhow::Error::msg)?;
            let settings = &config.auth.jwt;
            let secret = settings
                .secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .context("no HS256 secret: set auth.jwt.secret or TOLLGATE_JWT_SECRET")?;
            crate::auth::jwt::check_hs256_secret(secret)?;
            let token = crate::auth::jwt::mint_hs256(
                secret,
                &sub,
                ttl,
                settings.issuer.as_deref(),
                settings.audience.as_deref(),
                role.as_deref(),
            )?;
            println!("{token}");
        }
        Command::Credits(CreditsCommand::Grant {
            account: raw,
            amount,
            entry_type,
            description,
            reference,
            expires_in,
        }) => {
            let ledger = app::open_ledger(&config).await?;
            let entry_type = EntryType::parse(&entry_type)
                .with_context(|| format!("unknown type `{entry_type}`"))?;
            let outcome = crate::admin::grant(
                &*ledger,
                GrantRequest {
                    account: account(&raw)?,
                    entry_type,
                    amount,
                    description,
                    reference,
                    expires_at_ms: expires_in.map(|lifetime| {
                        let ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
                        crate::domain::time::now_ms().saturating_add(ms)
                    }),
                    draw_first_from: Vec::new(),
                },
            )
            .await?;
            if outcome.applied {
                println!(
                    "granted {amount} credits to {raw}; balance {}",
                    outcome.snapshot.balance
                );
            } else {
                println!(
                    "already applied (same reference); balance {}",
                    outcome.snapshot.balance
                );
            }
        }
        Command::Credits(CreditsCommand::Balance { account: raw }) => {
            let ledger = app::open_ledger(&config).await?;
            let snapshot = ledger
                .snapshot(&Bucket::Account(account(&raw)?), Credits::ZERO)
                .await?;
            println!("{raw}: {} credits", snapshot.balance);
        }
        Command::Keys(KeysCommand::Create {
            account: raw,
            name,
            spend_limit,
            models,
        }) => {
            let ledger = app::open_ledger(&config).await?;
            let created =
                crate::admin::create_key(&*ledger, account(&raw)?, name, spend_limit, models)
                    .await?;
            println!("{}", created.secret);
            eprintln!(
                "key id {} for {raw} (the key above is shown only once)",
                created.record.id
            );
        }
        Command::Keys(KeysCommand::Revoke { key_id }) => {
            let ledger = app::open_ledger(&config).await?;
            if !crate::admin::revoke_key(&*ledger, &key_id).await? {
                eprintln!("no live key `{key_id}`");
                return Ok(ExitCode::FAILURE);
            }
            println!("revoked {key_id}");
        }
        Command::Keys(KeysCommand::List { account: raw }) => {
            let ledger = app::open_ledger(&config).await?;
            for key in ledger.api_keys(&account(&raw)?).await? {
                let limit = key
                    .spend_limit
                    .map_or_else(|| "none".to_owned(), |l| l.to_string());
                let state = if key.is_revoked() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}…\t{state}\tspent {}\tlimit {limit}\t{}",
                    key.id, key.prefix, key.spent, key.name
                );
            }
        }
        Command::Ledger(LedgerCommand::Verify) => {
            let stores = app::open_stores(&config).await?;
            let problems = verify_books(
                stores.ledger.as_ref(),
                stores.payments.as_ref(),
                config.metering.overdraft,
            )
            .await?;
            if problems.is_empty() {
                println!("ledger consistent");
            } else {
                for problem in &problems {
                    println!("account {}: {}", problem.account, problem.problem);
                }
                println!("{} problem(s) found", problems.len());
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Pricing(PricingCommand::Check { .. }) | Command::MockUpstream { .. } => {
            unreachable!("handled before loading the config")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
