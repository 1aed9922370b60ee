//! Command-line options shared by every subcommand that touches the store, with the
//! `KILN_*` environment variables and an optional TOML file (`--config`).
//!
//! Precedence: command line > environment > TOML file > defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

/// Where the data lives (every subcommand that touches the store takes these).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory of the embedded SQLite database, created on first run (default: ./kiln-data).
    #[arg(long, env = "KILN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL: `postgres://user@host/db` selects PostgreSQL (default: embedded SQLite in
    /// --data-dir).
    #[arg(long, env = "KILN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// SQLite: fsync every commit (survives power loss; the default survives process crashes).
    #[arg(long, env = "KILN_SQLITE_SYNC_FULL")]
    pub sqlite_sync_full: bool,
    /// Pooled database connections for reads (PostgreSQL: also the writers' pool), default 16.
    /// On SQLite each reader is a connection with its own worker thread and page cache.
    #[arg(long, env = "KILN_MAX_CONNECTIONS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_connections: Option<u32>,
    /// PostgreSQL: MiB of resource JSON each node keeps between reads, checked against the
    /// database's version on every read (0: none), default 64. SQLite keeps none.
    #[arg(long, env = "KILN_RESOURCE_CACHE_MB", value_name = "MIB", value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub resource_cache_mb: Option<u64>,
    /// Optional TOML configuration file (keys: listen, data_dir, database, base_url, …).
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (default: 127.0.0.1:8080).
    #[arg(long, env = "KILN_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The FHIR base URL advertised to clients (default: http://<listen>/fhir).
    #[arg(long, env = "KILN_BASE_URL", value_name = "URL")]
    pub base_url: Option<String>,
    /// Refuse `PUT` of a resource that does not exist (update-as-create is on by default).
    #[arg(long, env = "KILN_NO_UPDATE_CREATE")]
    pub no_update_create: bool,
    /// Largest accepted request body in bytes (413 above).
    #[arg(long, env = "KILN_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// SMART authorization: `on` requires a bearer token on every FHIR request. Default: `off`
    /// on a loopback --listen address (with a warning), `on` otherwise.
    #[arg(long, env = "KILN_AUTH", value_enum)]
    pub auth: Option<crate::auth::AuthMode>,
    /// Allow `--auth off` on a non-loopback address.
    #[arg(long, env = "KILN_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Do not store the vendored R4/THO CodeSystems, ValueSets and ConceptMaps as resources at
    /// start (they are stored once per database by default; terminology operations use them
    /// either way).
    #[arg(long, env = "KILN_NO_CANONICAL_TERMINOLOGY")]
    pub no_canonical_terminology: bool,
    /// RFC 7591 dynamic client registration (default: on for loopback, off otherwise).
    #[arg(long, env = "KILN_DYNAMIC_REGISTRATION")]
    pub dynamic_registration: Option<bool>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The optional TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub base_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database: Option<String>,
    pub sqlite_sync_full: Option<bool>,
    pub max_connections: Option<u32>,
    pub resource_cache_mb: Option<u64>,
    pub update_create: Option<bool>,
    pub max_body_bytes: Option<usize>,
    pub load_canonical_terminology: Option<bool>,
}

impl FileConfig {
    pub fn load(path: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
        match path {
            None => Ok(FileConfig::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", p.display()))
            }
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl StoreArgs {
    pub fn store_config(&self, file: &FileConfig) -> kiln_store::StoreConfig {
        kiln_store::StoreConfig {
            data_dir: self
                .data_dir
                .clone()
                .or_else(|| file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("./kiln-data")),
            database: self.database.clone().or_else(|| file.database.clone()),
            sqlite_synchronous_full: self.sqlite_sync_full
                || file.sqlite_sync_full.unwrap_or(false),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(kiln_store::StoreConfig::default().max_connections),
            resource_cache_bytes: self
                .resource_cache_mb
                .or(file.resource_cache_mb)
                .map_or(kiln_store::DEFAULT_RESOURCE_CACHE_BYTES, |mb| mb << 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_file_parses_and_rejects_unknown_keys() {
        let c: FileConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\ndata_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.listen.unwrap().port(), 9000);
        assert!(toml::from_str::<FileConfig>("lisen = 1").is_err());
    }

    /// Nothing given on the command line.
    fn no_args() -> StoreArgs {
        StoreArgs {
            data_dir: None,
            database: None,
            sqlite_sync_full: false,
            max_connections: None,
            resource_cache_mb: None,
            config: None,
        }
    }

    #[test]
    fn max_connections_from_file_unless_given_on_the_command_line() {
        let file: FileConfig = toml::from_str("max_connections = 4").unwrap();
        let mut args = no_args();
        assert_eq!(args.store_config(&file).max_connections, 4);
        assert_eq!(
            args.store_config(&FileConfig::default()).max_connections,
            kiln_store::StoreConfig::default().max_connections
        );
        args.max_connections = Some(8);
        assert_eq!(args.store_config(&file).max_connections, 8);
    }

    #[test]
    fn resource_cache_size_in_mib_from_file_or_command_line() {
        let file: FileConfig = toml::from_str("resource_cache_mb = 0").unwrap();
        let mut args = no_args();
        assert_eq!(
            args.store_config(&FileConfig::default())
                .resource_cache_bytes,
            64 << 20
        );
        assert_eq!(args.store_config(&file).resource_cache_bytes, 0);
        args.resource_cache_mb = Some(256);
        assert_eq!(args.store_config(&file).resource_cache_bytes, 256 << 20);
    }
}
