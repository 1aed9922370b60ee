//! Test support: a fresh PostgreSQL database per test, on the server named by
//! `KILN_TEST_DATABASE_URL` (a maintenance connection URL ending in `/database`).

use sqlx::Connection;

use crate::StoreConfig;

pub(crate) struct TestDatabase {
    admin: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<random>`; `None`, with a printed notice, when `KILN_TEST_DATABASE_URL`
    /// is unset (the PostgreSQL variant of a test is then skipped).
    pub(crate) async fn create(prefix: &str) -> Option<TestDatabase> {
        let Ok(admin) = std::env::var("KILN_TEST_DATABASE_URL") else {
            eprintln!("notice: KILN_TEST_DATABASE_URL is not set: skipping the PostgreSQL variant");
            return None;
        };
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let url = match admin.rfind('/') {
            Some(i) if admin[..i].contains("://") && !admin[..i].ends_with('/') => {
                format!("{}/{name}", &admin[..i])
            }
            _ => panic!("KILN_TEST_DATABASE_URL must end in /database: {admin}"),
        };
        let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .unwrap();
        let _ = c.close().await;
        Some(TestDatabase { admin, name, url })
    }

    /// A store configuration for this database.
    pub(crate) fn config(&self, max_connections: u32) -> StoreConfig {
        StoreConfig {
            database: Some(self.url.clone()),
            max_connections,
            ..Default::default()
        }
    }

    /// Drops the database (closing whatever still uses it).
    pub(crate) async fn drop(self) {
        let mut c = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut c)
        .await;
    }
}
