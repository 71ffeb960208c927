//! Push: every blob the manifest references, then the manifest. A blob the repository has
//! (HEAD) is skipped; one another repository of the registry has is mounted (so a layer a
//! build left at that registry is never downloaded); the rest are uploaded monolithically, or in chunks when larger than the chunk size. A failed upload
//! session is started again, a bounded number of times. A tag already naming the same manifest
//! is left alone, so pushing an unchanged image uploads nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use super::client::{backoff, scope, Body, Client, Direction, Endpoint, Transfer};
use super::pull::{manifest_blobs, Descriptor, MANIFEST_ACCEPT};
use super::reference::Reference;
use super::{Local, RegistryError};
use crate::oci::digest::Digest;
use crate::oci::image::MEDIA_MANIFEST;

const PARALLEL_BLOBS: usize = 4;

/// What a push did.
#[derive(Debug, Default)]
pub struct Pushed {
    pub digest: String,
    pub uploaded: usize,
    pub mounted: usize,
    pub present: usize,
    pub manifest_uploaded: bool,
    /// The registry answered the manifest's PUT with `OCI-Subject`: it lists the manifest
    /// as a referrer of its subject by itself.
    pub subject_indexed: bool,
    /// Referrers pushed with it (attestation manifests).
    pub referrers: usize,
}

/// Upload chunk size: `$BUILDER_PUSH_CHUNK_SIZE` bytes, else 16 MiB. Larger blobs go in chunks.
fn chunk_size() -> u64 {
    std::env::var("BUILDER_PUSH_CHUNK_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(16 << 20)
}

/// An upload location, absolute.
fn location(ep: &Endpoint, response: &ureq::Response) -> Result<String, RegistryError> {
    let loc = response.header("location").ok_or_else(|| {
        RegistryError::Protocol(format!(
            "{}: an upload answer has no Location header",
            ep.registry
        ))
    })?;
    Ok(
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            format!("{}{}", ep.base, loc)
        },
    )
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{}{}{}={}", url, sep, key, value)
}

enum BlobOutcome {
    Present,
    Mounted,
    Uploaded,
}

/// Why an upload session ended early: start a new one (saying why, and how many bytes the
/// registry had accepted in it), or give up.
enum SessionError {
    Retry { why: String, accepted: u64 },
    Fatal(RegistryError),
}

/// An unknown session, a range it does not expect, or a transient server failure: the
/// session is lost, start another.
fn restarts_session(status: u16) -> bool {
    status == 404 || status == 416 || status == 429 || status >= 500
}

/// A failed request in a session that had `accepted` bytes: a lost connection means a new
/// session; anything else is final.
fn session_error(e: RegistryError, accepted: u64) -> SessionError {
    match e {
        RegistryError::Transport { detail, .. } => SessionError::Retry {
            why: detail,
            accepted,
        },
        RegistryError::Refused { .. } => SessionError::Retry {
            why: e.to_string(),
            accepted,
        },
        e => SessionError::Fatal(e),
    }
}

fn push_blob(
    client: &Client,
    ep: &Endpoint,
    local: &Local,
    repository: &str,
    d: &Descriptor,
) -> Result<BlobOutcome, RegistryError> {
    let what = format!("blob {} for {}/{}", d.digest, ep.registry, repository);
    let push_scope = scope(repository, "pull,push");
    let head_target = format!("/v2/{}/blobs/{}", repository, d.digest);
    let start_target = format!("/v2/{}/blobs/uploads/", repository);
    let mut mount_from = local
        .origins
        .in_registry(&d.digest, &ep.registry)
        .into_iter()
        .find(|r| r != repository);
    let mut last = String::new();
    // As for downloads, the budget counts sessions in a row that got no further than the
    // best one so far; a session that got further starts the count again.
    let mut attempt = 0u32;
    let mut best = 0u64;
    while attempt < client.settings.attempts {
        attempt += 1;
        if attempt > 1 || !last.is_empty() {
            client.notice(&format!(
                "{}: {}; starting the upload again (attempt {} of {})",
                what, last, attempt, client.settings.attempts
            ));
            std::thread::sleep(backoff(attempt.max(2) - 1));
        }
        // First, and after a failed session (whose last answer may have been lost): does
        // the repository have it?
        let response = client.send(
            ep,
            "HEAD",
            &head_target,
            &[],
            Body::Empty,
            std::slice::from_ref(&push_scope),
        )?;
        match response.status() {
            200 if last.is_empty() => return Ok(BlobOutcome::Present),
            200 => return Ok(BlobOutcome::Uploaded),
            404 => {}
            _ => return Err(ep.status_error("HEAD", &head_target, &what, response)),
        }
        let mut scopes = vec![push_scope.clone()];
        let target = match &mount_from {
            Some(from) => {
                scopes.push(scope(from, "pull"));
                format!("{}?mount={}&from={}", start_target, d.digest, from)
            }
            None => start_target.clone(),
        };
        let response = client.send(
            ep,
            "POST",
            &target,
            &[("Content-Length", "0".into())],
            Body::Empty,
            &scopes,
        )?;
        match response.status() {
            201 if mount_from.is_some() => return Ok(BlobOutcome::Mounted),
            202 => {}
            _ => return Err(ep.status_error("POST", &target, &what, response)),
        }
        // A mount the registry declined still opened an ordinary upload session.
        mount_from = None;
        let session = location(ep, &response)?;
        // Only now are the bytes needed: a layer left at another registry comes in here.
        let path = local.blobs.ensure(&d.digest)?;
        let size = std::fs::metadata(&path)
            .map_err(|e| RegistryError::Io {
                path: path.clone(),
                source: e,
            })?
            .len();
        match upload(client, ep, &session, &path, size, &d.digest, &push_scope) {
            Ok(()) => {
                client.transfer(&Transfer {
                    direction: Direction::Push,
                    digest: &d.digest,
                    done: size,
                    total: size,
                });
                return Ok(BlobOutcome::Uploaded);
            }
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(SessionError::Retry { why, accepted }) => {
                last = why;
                if accepted > best {
                    best = accepted;
                    attempt = 0;
                }
            }
        }
    }
    Err(RegistryError::Transport {
        host: ep.registry.clone(),
        detail: format!("uploading {}: {}", what, last),
        attempts: client.settings.attempts,
    })
}

/// Send the blob's bytes through the upload session at `session`, and close it.
fn upload(
    client: &Client,
    ep: &Endpoint,
    session: &str,
    path: &std::path::Path,
    size: u64,
    digest: &Digest,
    push_scope: &str,
) -> Result<(), SessionError> {
    let scopes = [push_scope.to_string()];
    let octets = ("Content-Type", "application/octet-stream".to_string());
    let chunk = chunk_size();
    let mut session = session.to_string();
    let final_body = if size <= chunk {
        Body::File {
            path,
            offset: 0,
            len: size,
        }
    } else {
        let mut offset = 0u64;
        while offset < size {
            let len = chunk.min(size - offset);
            let range = format!("{}-{}", offset, offset + len - 1);
            let response = client
                .send_once(
                    ep,
                    "PATCH",
                    &session,
                    &[octets.clone(), ("Content-Range", range)],
                    Body::File { path, offset, len },
                    &scopes,
                )
                .map_err(|e| session_error(e, offset))?;
            if response.status() != 202 {
                let status = response.status();
                if restarts_session(status) {
                    return Err(SessionError::Retry {
                        why: format!("chunk upload answered {}", status),
                        accepted: offset,
                    });
                }
                let what = format!("chunk {} of blob {}", offset / chunk, digest);
                return Err(SessionError::Fatal(
                    ep.status_error("PATCH", &session, &what, response),
                ));
            }
            session = location(ep, &response).map_err(SessionError::Fatal)?;
            offset += len;
            if offset < size {
                client.transfer(&Transfer {
                    direction: Direction::Push,
                    digest,
                    done: offset,
                    total: size,
                });
            }
        }
        Body::Empty
    };
    let close = with_query(&session, "digest", &digest.to_string());
    let mut headers = vec![octets];
    if matches!(final_body, Body::Empty) {
        headers.push(("Content-Length", "0".into()));
    }
    // What the registry holds of this session before the closing request.
    let accepted = if matches!(final_body, Body::Empty) {
        size
    } else {
        0
    };
    let response = client
        .send_once(ep, "PUT", &close, &headers, final_body, &scopes)
        .map_err(|e| session_error(e, accepted))?;
    match response.status() {
        201 | 204 => Ok(()),
        s if restarts_session(s) => Err(SessionError::Retry {
            why: format!("upload answered {}", response.status()),
            accepted,
        }),
        400 => {
            let body = response.into_string().unwrap_or_default();
            if body.contains("DIGEST_INVALID") {
                Err(SessionError::Fatal(RegistryError::DigestMismatch {
                    what: format!("blob {} as the registry received it", digest),
                    expected: digest.to_string(),
                    got: "another digest".into(),
                }))
            } else {
                Err(SessionError::Retry {
                    why: format!("upload answered 400: {}", body.trim()),
                    accepted,
                })
            }
        }
        _ => Err(SessionError::Fatal(ep.status_error(
            "PUT",
            &close,
            &format!("blob {}", digest),
            response,
        ))),
    }
}

/// Push the stored manifest `manifest_digest` (and everything it references) to `dest`.
pub fn push(
    client: &Client,
    local: &Local,
    manifest_digest: &Digest,
    dest: &Reference,
) -> Result<Pushed, RegistryError> {
    let display = dest.familiar();
    let ep = client.endpoint(&dest.registry)?;
    let repository = &dest.repository;
    let bytes = local.blobs.get(manifest_digest)?;
    let manifest: Value = serde_json::from_slice(&bytes).map_err(|e| {
        RegistryError::Protocol(format!("stored manifest {}: {}", manifest_digest, e))
    })?;
    let media_type = manifest["mediaType"]
        .as_str()
        .unwrap_or(MEDIA_MANIFEST)
        .to_string();
    // An index: each manifest it lists goes first, by digest; then the index itself.
    let is_index = super::pull::is_index(&media_type);
    let mut children = Vec::new();
    if is_index {
        for m in manifest["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let child: Digest = m["digest"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .ok_or_else(|| {
                    RegistryError::Protocol(format!(
                        "stored index {}: a manifest without a digest",
                        manifest_digest
                    ))
                })?;
            let child_ref = Reference {
                tag: None,
                digest: Some(child.clone()),
                ..dest.clone()
            };
            children.push(push(client, local, &child, &child_ref)?);
        }
    }
    let blobs = if is_index {
        Vec::new()
    } else {
        manifest_blobs(&manifest, &display)?
    };
    let counts = [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ];
    let push_all = |counted: bool| {
        super::for_each_parallel(&blobs, PARALLEL_BLOBS, |d| {
            let i = match push_blob(client, &ep, local, repository, d)? {
                BlobOutcome::Present => 0,
                BlobOutcome::Mounted => 1,
                BlobOutcome::Uploaded => 2,
            };
            if counted {
                counts[i].fetch_add(1, Ordering::Relaxed);
            }
            local.origins.record(&d.digest, &ep.registry, repository);
            Ok(())
        })
    };
    push_all(true)?;
    let reference = dest.tag.clone().unwrap_or_else(|| match &dest.digest {
        Some(d) => d.to_string(),
        None => "latest".into(),
    });
    let target = format!("/v2/{}/manifests/{}", repository, reference);
    let scopes = [scope(repository, "pull,push")];
    let head = client.send(
        ep.as_ref(),
        "HEAD",
        &target,
        &[("Accept", MANIFEST_ACCEPT.to_string())],
        Body::Empty,
        &scopes,
    )?;
    let unchanged = head.status() == 200
        && head.header("docker-content-digest") == Some(manifest_digest.to_string().as_str());
    let mut attempt = 0;
    let mut subject_indexed = false;
    while !unchanged && attempt < client.settings.attempts.max(1) {
        attempt += 1;
        let response = client.send(
            &ep,
            "PUT",
            &target,
            &[("Content-Type", media_type.clone())],
            Body::Bytes(&bytes),
            &scopes,
        )?;
        let status = response.status();
        if status == 201 || status == 200 {
            subject_indexed = response.header("oci-subject").is_some();
            if let Some(d) = response.header("docker-content-digest") {
                if d != manifest_digest.to_string() {
                    return Err(RegistryError::DigestMismatch {
                        what: format!("manifest {} as the registry stored it", display),
                        expected: manifest_digest.to_string(),
                        got: d.to_string(),
                    });
                }
            }
            break;
        }
        let error = ep.status_error("PUT", &target, &format!("manifest {}", display), response);
        // Every blob was confirmed in the repository, yet the registry did not find one: a
        // concurrent writer of the same blob can make it unreadable for a moment (the
        // distribution server rewrites a blob's link in place on each completed upload).
        // Confirm each blob again, sending what is really gone, then put it again.
        let unknown_blob = matches!(&error, RegistryError::Status { status: 400, body, .. }
            if body.contains("BLOB_UNKNOWN") || body.contains("MANIFEST_UNKNOWN"));
        if !unknown_blob || attempt >= client.settings.attempts {
            return Err(error);
        }
        client.notice(&format!(
            "{}: the registry did not find a blob the manifest names, which was confirmed there; confirming again (attempt {} of {})",
            display,
            attempt + 1,
            client.settings.attempts
        ));
        std::thread::sleep(backoff(attempt));
        push_all(false)?;
        for child in &children {
            let child_ref = Reference {
                tag: None,
                digest: child.digest.parse().ok(),
                ..dest.clone()
            };
            if let Some(d) = &child_ref.digest {
                push(client, local, d, &child_ref)?;
            }
        }
    }
    Ok(Pushed {
        digest: manifest_digest.to_string(),
        present: counts[0].load(Ordering::Relaxed)
            + children.iter().map(|c| c.present).sum::<usize>(),
        mounted: counts[1].load(Ordering::Relaxed)
            + children.iter().map(|c| c.mounted).sum::<usize>(),
        uploaded: counts[2].load(Ordering::Relaxed)
            + children.iter().map(|c| c.uploaded).sum::<usize>(),
        manifest_uploaded: !unchanged,
        subject_indexed,
        referrers: 0,
    })
}

/// Push `attestations` as referrers of the images they are about (see [`push_referrers`]),
/// grouped by image. Returns what was pushed.
pub fn push_attestations(
    client: &Client,
    local: &Local,
    attestations: &[crate::oci::image::StoredAttestation],
    dest: &Reference,
) -> Result<Vec<Pushed>, RegistryError> {
    let mut by_subject: std::collections::BTreeMap<&Digest, Vec<crate::oci::document::Descriptor>> =
        Default::default();
    for a in attestations {
        by_subject
            .entry(&a.subject)
            .or_default()
            .push(crate::oci::image::referrer_descriptor(a));
    }
    let mut pushed = Vec::new();
    for (subject, referrers) in by_subject {
        pushed.extend(push_referrers(client, local, subject, &referrers, dest)?);
    }
    Ok(pushed)
}

/// Push `referrers` (stored manifests whose `subject` is `subject`, with the descriptors a
/// referrers index lists them by) into `dest`'s repository, so that the registry lists
/// them as referrers of `subject`: each by digest, then, unless the registry indexed them
/// itself (it said `OCI-Subject`, or its referrers API lists them), added to the fallback
/// tag's index (`sha256-<hex>`), as the distribution spec says. Returns what was pushed.
pub fn push_referrers(
    client: &Client,
    local: &Local,
    subject: &Digest,
    referrers: &[crate::oci::document::Descriptor],
    dest: &Reference,
) -> Result<Vec<Pushed>, RegistryError> {
    let mut pushed = Vec::new();
    for r in referrers {
        let by_digest = Reference {
            tag: None,
            digest: Some(r.digest.clone()),
            ..dest.clone()
        };
        pushed.push(push(client, local, &r.digest, &by_digest)?);
    }
    if referrers.is_empty() || pushed.iter().all(|p| p.subject_indexed) {
        return Ok(pushed);
    }
    let display = dest.familiar();
    let ep = client.endpoint(&dest.registry)?;
    let target = format!(
        "/v2/{}/manifests/{}",
        dest.repository,
        super::pull::referrers_tag(subject)
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (listed, source) =
            super::pull::list_referrers(client, &ep, &dest.repository, subject, &display)?;
        let listed_digests: Vec<&str> =
            listed.iter().filter_map(|m| m["digest"].as_str()).collect();
        let missing: Vec<&crate::oci::document::Descriptor> = referrers
            .iter()
            .filter(|r| !listed_digests.contains(&r.digest.to_string().as_str()))
            .collect();
        if source == super::pull::ReferrersSource::Api || missing.is_empty() {
            return Ok(pushed);
        }
        let mut manifests = listed.clone();
        for r in missing {
            manifests.push(serde_json::to_value(r).unwrap_or(Value::Null));
        }
        let index = crate::oci::image::canonical_json(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::image::MEDIA_INDEX,
            "manifests": manifests,
        }));
        let response = client.send(
            &ep,
            "PUT",
            &target,
            &[("Content-Type", crate::oci::image::MEDIA_INDEX.to_string())],
            Body::Bytes(&index),
            &[scope(&dest.repository, "pull,push")],
        )?;
        if response.status() == 201 || response.status() == 200 {
            return Ok(pushed);
        }
        let error = ep.status_error(
            "PUT",
            &target,
            &format!("the referrers of {} (fallback tag)", subject),
            response,
        );
        // As for any manifest: a concurrent writer of the same referrer can make it
        // unreadable for a moment. Confirm the referrers again, then put the list again.
        let unknown = matches!(&error, RegistryError::Status { status: 400, body, .. }
            if body.contains("BLOB_UNKNOWN") || body.contains("MANIFEST_UNKNOWN"));
        if !unknown || attempt >= client.settings.attempts.max(1) {
            return Err(error);
        }
        std::thread::sleep(backoff(attempt));
        for r in referrers {
            let by_digest = Reference {
                tag: None,
                digest: Some(r.digest.clone()),
                ..dest.clone()
            };
            push(client, local, &r.digest, &by_digest)?;
        }
    }
}
