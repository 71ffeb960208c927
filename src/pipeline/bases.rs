//! Base images for the frontend: as the local store knows them (for the checks, which pull
//! nothing), or fetched as `--pull` says (for lowering).

use std::collections::BTreeMap;

use crate::frontend::checks::BaseImages;
use crate::frontend::graph::{lookup_context, NamedContext};
use crate::frontend::BaseResolver;
use crate::oci::platform::Platform;
use crate::progress::Reporter;
use crate::store::Store;

/// Base images as the local store knows them, for the build's platform (nothing is pulled
/// for a check), with the `--build-context`s that stand for some of them.
pub(super) struct StoreBases<'a>(
    pub &'a Store,
    pub String,
    pub &'a BTreeMap<String, NamedContext>,
);

impl StoreBases<'_> {
    /// The base `image` names, as readable without a network: a store name, or a local
    /// layout or archive (imported into the store, as the build would). A named context
    /// that is an image stands for it; a local one is no image.
    fn base(&self, image: &str, wanted: &str) -> Option<crate::oci::image::StoredImage> {
        use crate::store::sources::{self, ImageSource};
        let image = match lookup_context(self.2, image) {
            Some((_, NamedContext::Image(r))) => r.as_str(),
            Some((_, NamedContext::Local)) => return None,
            None => image,
        };
        match ImageSource::parse(image) {
            ImageSource::Store(_) => self.0.image_for(image, wanted).ok(),
            _ => {
                let client = crate::registry::Client::new(crate::registry::Settings::default());
                let pulling = sources::Pulling {
                    policy: crate::registry::PullPolicy::Never,
                    client: &client,
                    log: &|_| {},
                    layers: crate::registry::pull::Layers::WhenNeeded,
                };
                let platform = Platform::parse(wanted).unwrap_or_else(Platform::host);
                sources::fetch(self.0, image, &platform, &pulling).ok()
            }
        }
    }
}

impl BaseImages for StoreBases<'_> {
    fn env(&self, image: &str) -> Option<Vec<(String, String)>> {
        self.base(image, &self.1).map(|i| i.state.env())
    }
    fn platform(&self, image: &str, wanted: &str) -> Option<String> {
        let i = self.base(image, wanted)?;
        let c = &i.state.config;
        let mut p = format!("{}/{}", c.os(), c.architecture());
        if let Some(v) = c.variant() {
            p.push('/');
            p.push_str(v);
        }
        Some(p)
    }
}

/// Base images from the store, pulled as `--pull` says; pulls are logged.
pub struct StoreResolver<'a> {
    pub store: &'a Store,
    pub client: &'a crate::registry::Client,
    pub policy: crate::registry::PullPolicy,
    pub reporter: &'a dyn Reporter,
}

impl BaseResolver for StoreResolver<'_> {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<crate::oci::image::StoredImage, Box<dyn std::error::Error + Send + Sync>> {
        let reporter = self.reporter;
        let log = move |m: &str| reporter.log(0, m);
        let pulling = crate::store::sources::Pulling {
            policy: self.policy,
            client: self.client,
            log: &log,
            layers: crate::registry::pull::Layers::WhenNeeded,
        };
        Ok(crate::store::sources::fetch(
            self.store, reference, platform, &pulling,
        )?)
    }
}
