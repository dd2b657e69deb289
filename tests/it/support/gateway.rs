//! A gateway started in-process from a TOML string, in its own temp folder.

use std::net::SocketAddr;
use std::path::PathBuf;

use authgate::{App, Config};

#[derive(Debug)]
pub struct TestGateway {
    pub app: Option<App>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestGateway {
    /// `toml` may omit `[listen]` (then 127.0.0.1:0 is used); `{dir}` in it is
    /// replaced with the temp folder. The default store is `memory`.
    pub async fn start(toml: &str) -> Self {
        Self::try_start(toml)
            .await
            .unwrap_or_else(|e| panic!("gateway failed to start: {e}"))
    }

    pub async fn try_start(toml: &str) -> Result<Self, authgate::app::StartError> {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, toml).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        toml: &str,
    ) -> Result<Self, authgate::app::StartError> {
        let mut text = toml.replace("{dir}", &dir.path().display().to_string());
        if !text.contains("[listen]") {
            text = format!("[listen]\naddr = \"127.0.0.1:0\"\n{text}");
        }
        if !text.contains("[store]") {
            text.push_str("\n[store]\nkind = \"memory\"\n");
        }
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::load(&config_path)?;
        let app = App::start(config).await?;
        Ok(TestGateway {
            addr: app.addr,
            admin: app.admin_addr,
            app: Some(app),
            dir,
            config_path,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.admin.expect("no [admin] in this config"),
            path
        )
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    /// Waits (bounded) until every provider holds a valid token.
    pub async fn ready(&self) {
        let gw = self.app().gateway.clone();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if gw.snapshot().providers.values().all(|p| p.is_ready()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "providers not ready in 10 s"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub fn provider(&self, name: &str) -> std::sync::Arc<authgate::token::Provider> {
        self.app()
            .gateway
            .snapshot()
            .providers
            .get(name)
            .cloned()
            .expect("no such provider")
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }
}
