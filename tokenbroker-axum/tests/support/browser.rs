//! A real headless Chromium for end-to-end tests, driven over WebDriver (fantoccini) through
//! Debian's `chromedriver`. `scripts/setup-browser.sh` installs both; without them
//! [`Browser::start`] answers [`Skip`] and the test reports `SKIPPED: ...` instead of running.
//!
//! Include it with `#[path = "support/browser.rs"] mod browser;`.
//!
//! The helpers panic on failure with the page's URL and text in the message: a browser test
//! that fails should say where the browser was and what it showed.
#![allow(dead_code)]

use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::cookies::Cookie;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use url::Url;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long a helper waits for the page (an element, a navigation) before it gives up. These
/// are waits for a slow machine, not assertions on speed: a loaded 2-core CI box can take many
/// seconds to start Chromium or to render a page.
pub const PAGE_WAIT: Duration = Duration::from_secs(90);

/// When set (to anything but `0`), a browser that cannot start fails the test instead of
/// skipping it: for machines where `scripts/setup-browser.sh` is expected to have worked.
pub const REQUIRE_BROWSER_ENV: &str = "TOKENBROKER_REQUIRE_BROWSER";

/// Why the browser test cannot run here.
#[derive(Debug)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Skip {
    /// Says the test is skipped: `println!`/`eprintln!` (what the harness captures, shown with
    /// `--nocapture`) and straight to the process's stderr, which the harness does not capture,
    /// so that a plain `cargo test` shows it too. Panics instead when [`REQUIRE_BROWSER_ENV`]
    /// is set.
    pub fn report(&self, test: &str) {
        if std::env::var(REQUIRE_BROWSER_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
            panic!("{test}: the browser is required ({REQUIRE_BROWSER_ENV}) but: {self}");
        }
        let line = format!("SKIPPED: {test}: {self}");
        eprintln!("{line}");
        println!("{line}");
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

/// A headless Chromium session. Dropping it kills chromedriver and the browser (their whole
/// process group) and removes the profile directory; [`Browser::close`] ends the session
/// politely first.
pub struct Browser {
    client: Client,
    driver: Child,
    dir: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a fresh headless Chromium under it.
    pub async fn start() -> Result<Browser, Skip> {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            if !Path::new(bin).exists() {
                return Err(Skip(format!(
                    "{bin} not found (run scripts/setup-browser.sh to install Debian's chromium and chromium-driver)"
                )));
            }
        }
        let dir = fresh_dir()?;
        let profile = dir.join("profile");
        let log_path = dir.join("chromedriver.log");
        let port = free_port().map_err(|e| Skip(format!("no free loopback port: {e}")))?;
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Skip(format!("cannot create {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Skip(format!("cannot clone a file handle: {e}")))?;
        let mut command = Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group, so that Drop can kill chromedriver and the browsers it started.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command
            .spawn()
            .map_err(|e| Skip(format!("cannot start {CHROMEDRIVER}: {e}")))?;
        let mut guard = StartGuard {
            driver: Some(driver),
            dir: Some(dir.clone()),
        };

        // Ready when it accepts connections.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                break;
            }
            if let Some(Ok(Some(status))) = guard.driver.as_mut().map(Child::try_wait) {
                return Err(Skip(format!(
                    "{CHROMEDRIVER} exited ({status}) before listening; its log:\n{}",
                    read_log(&log_path)
                )));
            }
            if Instant::now() > deadline {
                return Err(Skip(format!(
                    "{CHROMEDRIVER} did not listen on {addr} within {PAGE_WAIT:?}; its log:\n{}",
                    read_log(&log_path)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    // Without these Chromium keeps calling home (updates, sync, QUIC probes),
                    // which on a closed network is a flood of refused connections.
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    // Only loopback names resolve: the pages' external links (oidc-provider's
                    // pages @import a web font) fail at once instead of leaving the machine.
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                    "--window-size=1280,1024",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        // chromedriver speaks plain HTTP on loopback: no TLS stack (whose default crypto
        // provider is ambiguous when the workspace's features enable two of them).
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        let client = builder
            .capabilities(capabilities)
            .connect(&format!("http://{addr}"))
            .await
            .map_err(|e| {
                Skip(format!(
                    "Chromium did not start under chromedriver: {e}; chromedriver's log:\n{}",
                    read_log(&log_path)
                ))
            })?;
        let driver = guard
            .driver
            .take()
            .expect("the guard holds chromedriver until here");
        guard.dir = None;
        Ok(Browser {
            client,
            driver,
            dir,
        })
    }

    /// The fantoccini client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&self, url: &str) {
        if let Err(e) = self.client.goto(url).await {
            self.fail(&format!("cannot open {url}: {e}")).await;
        }
    }

    /// Waits (up to [`PAGE_WAIT`]) for an element matching `css` and returns it.
    pub async fn wait_for(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(PAGE_WAIT)
            .every(Duration::from_millis(100))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                self.fail(&format!("no element `{css}` within {PAGE_WAIT:?}: {e}"))
                    .await
            }
        }
    }

    /// Whether an element matching `css` is on the page now (no waiting).
    pub async fn has(&self, css: &str) -> bool {
        self.client.find(Locator::Css(css)).await.is_ok()
    }

    /// Types `text` into the element matching `css` (waiting for it), replacing its value.
    pub async fn fill(&self, css: &str, text: &str) {
        let element = self.wait_for(css).await;
        if let Err(e) = element.clear().await {
            self.fail(&format!("cannot clear `{css}`: {e}")).await;
        }
        if let Err(e) = element.send_keys(text).await {
            self.fail(&format!("cannot type into `{css}`: {e}")).await;
        }
    }

    /// Clicks the element matching `css` (waiting for it).
    pub async fn click(&self, css: &str) {
        let element = self.wait_for(css).await;
        if let Err(e) = element.click().await {
            self.fail(&format!("cannot click `{css}`: {e}")).await;
        }
    }

    /// Clicks the element matching `css` and waits until the browser has left the current URL
    /// (a form post and its redirects).
    pub async fn click_and_wait_for_navigation(&self, css: &str) {
        let before = self.current_url().await;
        self.click(css).await;
        self.wait_until(
            &format!("navigation away from {before} after clicking `{css}`"),
            |url, _| url != &before,
        )
        .await;
    }

    /// The URL the browser shows.
    pub async fn current_url(&self) -> Url {
        match self.client.current_url().await {
            Ok(url) => url,
            Err(e) => panic!("cannot read the browser's URL: {e}"),
        }
    }

    /// The text of the page's body as rendered (`innerText`), empty when there is none.
    pub async fn page_text(&self) -> String {
        self.client
            .execute(
                "return document.body ? document.body.innerText : '';",
                Vec::new(),
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The cookies the browser would send to the current page.
    pub async fn cookies(&self) -> Vec<Cookie<'static>> {
        match self.client.get_all_cookies().await {
            Ok(cookies) => cookies,
            Err(e) => self.fail(&format!("cannot read cookies: {e}")).await,
        }
    }

    /// Waits (up to [`PAGE_WAIT`]) until `done(url, page_text)` holds, and returns that URL.
    pub async fn wait_until(&self, what: &str, mut done: impl FnMut(&Url, &str) -> bool) -> Url {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            if let Ok(url) = self.client.current_url().await {
                let text = self.page_text().await;
                if done(&url, &text) {
                    return url;
                }
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {what} within {PAGE_WAIT:?}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's text contains `needle`.
    pub async fn wait_for_text(&self, needle: &str) -> Url {
        self.wait_until(&format!("page text containing {needle:?}"), |_, text| {
            text.contains(needle)
        })
        .await
    }

    /// Where the browser is and what it shows, for failure messages.
    pub async fn describe(&self) -> String {
        let url = match self.client.current_url().await {
            Ok(url) => url.to_string(),
            Err(e) => format!("(unknown: {e})"),
        };
        let text = self.page_text().await;
        format!("browser at {url}; the page says:\n{}", text.trim())
    }

    /// Panics with `message`, the page's URL and its text.
    pub async fn fail(&self, message: &str) -> ! {
        let described = self.describe().await;
        panic!("{message}\n{described}")
    }

    /// Ends the WebDriver session (Chromium quits), then stops chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop does the rest.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills chromedriver's process group and removes the directory if `start` gives up half-way.
struct StartGuard {
    driver: Option<Child>,
    dir: Option<PathBuf>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            kill_group(&mut driver);
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGKILL to the process group led by `child` (chromedriver and the Chromium it started), then
/// reaps `child`.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// A new empty directory under the system's temporary directory, for Chromium's profile and
/// chromedriver's log.
fn fresh_dir() -> Result<PathBuf, Skip> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tokenbroker-browser-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Skip(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn read_log(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Whether `url` is one of oidc-provider's own pages during an authorization: the interaction
/// pages (`/interaction/<uid>`), the authorization endpoint and its resume step (`/auth/<uid>`).
fn is_oidc_provider_page(url: &Url) -> bool {
    let path = url.path();
    path.starts_with("/interaction/") || path == "/auth" || path.starts_with("/auth/")
}

/// Signs in on oidc-provider's development pages (tests/idp with `INTERACTIONS=pages`), where
/// the browser must already be (after opening an authorization URL): types `login` and
/// `password` into the login form and presses "Sign-in", then presses "Continue" on the consent
/// page. Either page may be skipped by the provider (an existing session, a grant that already
/// covers the request), and when both are the browser is already past the provider, which is
/// fine. Returns the first URL outside the provider, where it redirected the
/// browser (the client's redirect URI, with `code` and `state`, or `error`).
pub async fn sign_in_at_oidc_provider(browser: &Browser, login: &str, password: &str) -> Url {
    const LOGIN_FORM: &str = "form input[name=prompt][value=login]";
    const CONSENT_FORM: &str = "form input[name=prompt][value=consent]";
    const SUBMIT: &str = "form button.login-submit";
    let start = browser.current_url().await;
    if !is_oidc_provider_page(&start) {
        // An existing session and grant: the provider redirected at once.
        return start;
    }
    let provider = start.origin();
    let (mut logins, mut consents) = (0, 0);
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let url = browser.current_url().await;
        if url.origin() != provider {
            return url;
        }
        if browser.has(LOGIN_FORM).await {
            logins += 1;
            if logins > 1 {
                browser
                    .fail(&format!(
                        "oidc-provider showed its login page again after signing in as {login:?}"
                    ))
                    .await;
            }
            browser.fill("form input[name=login]", login).await;
            browser.fill("form input[name=password]", password).await;
            browser.click_and_wait_for_navigation(SUBMIT).await;
            continue;
        }
        if browser.has(CONSENT_FORM).await {
            consents += 1;
            if consents > 1 {
                browser
                    .fail("oidc-provider showed its consent page again after consent")
                    .await;
            }
            browser.click_and_wait_for_navigation(SUBMIT).await;
            continue;
        }
        let text = browser.page_text().await;
        if text.contains("oops!") || text.contains("something went wrong") {
            browser
                .fail("oidc-provider answered with an error page during sign-in")
                .await;
        }
        if Instant::now() > deadline {
            browser
                .fail(&format!(
                    "neither a login nor a consent page of oidc-provider ({provider:?}) nor a redirect away from it within {PAGE_WAIT:?}"
                ))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
