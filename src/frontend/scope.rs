//! Variables in scope while walking a stage: build args, ARG declarations and ENV values, with
//! Docker's precedence (ENV over ARG) and the predefined ARGs that need no declaration.

use std::collections::BTreeMap;

use crate::syntax::expand::{ExpandError, LexOptions, Lexer};

/// Proxy ARGs usable in RUN without an ARG line (and kept out of history, as docker does).
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

pub use crate::oci::platform::Platform;

impl Platform {
    /// The automatic platform ARGs (`TARGETPLATFORM`, `BUILDARCH`, ...).
    pub fn args(target: &Platform, build: &Platform) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (prefix, p) in [("TARGET", target), ("BUILD", build)] {
            m.insert(format!("{}PLATFORM", prefix), p.spec());
            m.insert(format!("{}OS", prefix), p.os.clone());
            m.insert(format!("{}ARCH", prefix), p.architecture.clone());
            m.insert(
                format!("{}VARIANT", prefix),
                p.variant.clone().unwrap_or_default(),
            );
        }
        m
    }
}

/// The variables of one stage at one point of its instructions.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Declared ARGs with their values (a declared ARG without value is unset, not empty).
    pub args: BTreeMap<String, Option<String>>,
    /// ARG names in the order the stage declares them, repeats included (RUN's history
    /// lists them so).
    pub declared: Vec<String>,
    /// The image's environment, in order.
    env: Vec<(String, String)>,
    /// Where each ENV name sits in `env`: lookups stay O(1) however long the file.
    index: std::collections::HashMap<String, usize>,
}

impl Scope {
    /// A scope with these ARGs and this environment.
    pub fn new(args: BTreeMap<String, Option<String>>, env: Vec<(String, String)>) -> Scope {
        let mut s = Scope {
            args,
            ..Scope::default()
        };
        for (k, v) in env {
            s.set_env(&k, &v);
        }
        s
    }

    /// Declare an ARG with its value for this point on.
    pub fn declare(&mut self, name: &str, value: Option<String>) {
        self.args.insert(name.to_string(), value);
        self.declared.push(name.to_string());
    }

    /// The environment, in order.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Look a name up: ENV wins over ARG.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some(&i) = self.index.get(name) {
            return Some(self.env[i].1.clone());
        }
        self.args.get(name).cloned().flatten()
    }

    /// Set or replace an ENV variable, keeping the first position.
    pub fn set_env(&mut self, key: &str, value: &str) {
        match self.index.get(key) {
            Some(&i) => self.env[i].1 = value.to_string(),
            None => {
                self.index.insert(key.to_string(), self.env.len());
                self.env.push((key.to_string(), value.to_string()));
            }
        }
    }

    /// Expand one word (quotes removed) with this scope.
    pub fn word(&self, escape: char, input: &str) -> Result<String, ExpandError> {
        Lexer::new(escape, LexOptions::default()).word(input, &|n| self.get(n))
    }

    /// Expand and split into words.
    pub fn words(&self, escape: char, input: &str) -> Result<Vec<String>, ExpandError> {
        Lexer::new(escape, LexOptions::default()).words(input, &|n| self.get(n))
    }
}
