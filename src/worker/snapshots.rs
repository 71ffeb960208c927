//! Layer snapshots and root filesystem views.
//!
//! With overlayfs, every layer is unpacked once, in overlay format, into
//! `snapshots/<chain id>/fs` and shared (read-only) by every step and every build; a stage's
//! root filesystem is a read-only overlay of its layers' snapshots, mounted in builder's own
//! private mount namespace (see [`enter_private_mount_namespace`]), so it can never outlive
//! builder. Without overlayfs, a view is a private directory the layers are unpacked into.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{umount2, MntFlags, MsFlags};

use super::syscall::{Host, OverlaySpec, Syscall};
use super::Snapshotter;
use crate::oci::blobs::BlobStore;
use crate::oci::digest::Digest;
use crate::oci::image::LayerRef;
use crate::oci::unpack::{self, UnpackOptions};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error(transparent)]
    Blob(#[from] crate::oci::blobs::BlobError),
    #[error("mount {what}: {errno}")]
    Mount {
        what: String,
        errno: nix::errno::Errno,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Give builder a private mount namespace, so the views it mounts vanish with it whatever
/// way it ends. Must run before any thread starts.
pub fn enter_private_mount_namespace() -> Result<(), SnapshotError> {
    enter_private_mount_namespace_with(&Host)
}

/// [`enter_private_mount_namespace`] through `sys`.
pub fn enter_private_mount_namespace_with(sys: &dyn Syscall) -> Result<(), SnapshotError> {
    sys.unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|errno| SnapshotError::Mount {
            what: "a private mount namespace".into(),
            errno,
        })?;
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .map_err(|errno| SnapshotError::Mount {
        what: "/ private".into(),
        errno,
    })
}

/// The chain id of a layer on top of the chain `prev` (the diff_id itself for the bottom).
pub fn next_chain(prev: Option<&Digest>, diff_id: &Digest) -> Digest {
    match prev {
        None => diff_id.clone(),
        Some(prev) => Digest::of(format!("{} {}", prev, diff_id).as_bytes()),
    }
}

/// Chain ids of a layer stack: `chain[0] = diff_id[0]`, `chain[n] = sha256(chain[n-1] + " " + diff_id[n])`.
pub fn chain_ids(layers: &[LayerRef]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::new();
    for l in layers {
        let next = next_chain(out.last(), &l.diff_id);
        out.push(next);
    }
    out
}

/// Serialises the chdir around view mounts (stages mount from several threads).
static MOUNT_CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The longest mount option string the kernel takes (one page, minus a margin).
const MAX_MOUNT_DATA: usize = 4000;

/// overlay's `lowerdir=` for `lowers`, with paths under `base` made relative to it (the caller
/// mounts from `base` as working directory): twice as many layers fit in one page.
pub fn lowerdir_option(lowers: &[PathBuf], base: &Path) -> Result<String, SnapshotError> {
    let parts: Vec<String> = lowers
        .iter()
        .map(|l| match l.strip_prefix(base) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => l.display().to_string(),
        })
        .collect();
    let data = format!("lowerdir={}", parts.join(":"));
    if data.len() > MAX_MOUNT_DATA {
        return Err(SnapshotError::Mount {
            what: format!(
                "an overlay of {} layers (too many for one mount)",
                lowers.len()
            ),
            errno: nix::errno::Errno::E2BIG,
        });
    }
    Ok(data)
}

/// overlayfs's own limit on stacked lower directories (OVL_MAX_STACK).
pub const MAX_LOWERS: usize = 500;

/// How many layers are flattened together once a stack passes [`MAX_LOWERS`].
const FLATTEN_CHUNK: usize = 128;

/// Mount an overlay of `lowers` (top first) on `target`, writable when `upper_work` is given.
/// The new mount API (`fsopen`/`fsconfig` with one `lowerdir+` per layer, Linux 6.8 and later)
/// has no limit on the option string, so any number of layers up to overlayfs's own
/// [`MAX_LOWERS`] mounts; older kernels get the classic `mount(2)` with the lower dirs named
/// relative to `base`, which the process chdirs into (the caller restores its directory).
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
    target: &Path,
    readonly: bool,
    nodev: bool,
    base: &Path,
    scratch: &Path,
) -> Result<(), SnapshotError> {
    let fitted = fit_lowers(lowers, base, scratch)?;
    let spec = OverlaySpec {
        lowers: fitted,
        upper_work: upper_work.map(|(u, w)| (u.to_path_buf(), w.to_path_buf())),
        target: target.to_path_buf(),
        readonly,
        nodev,
        userxattr: crate::worker::rootless(),
    };
    mount_overlay_with(&Host, &spec, base)
}

/// [`mount_overlay`] of lowers that fit one overlay, through `sys`: the new mount API, else
/// the classic `mount(2)` from `base`.
pub fn mount_overlay_with(
    sys: &dyn Syscall,
    spec: &OverlaySpec,
    base: &Path,
) -> Result<(), SnapshotError> {
    let (lowers, target) = (spec.lowers.as_slice(), spec.target.as_path());
    match sys.mount_overlay_new_api(spec) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL) => {}
        Err(errno) => {
            return Err(SnapshotError::Mount {
                what: format!(
                    "an overlay of {} layers on {}",
                    lowers.len(),
                    target.display()
                ),
                errno,
            })
        }
    }
    let mut data = lowerdir_option(lowers, base)?;
    if let Some((upper, work)) = &spec.upper_work {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            upper.display(),
            work.display()
        ));
    }
    if spec.userxattr {
        data.push_str(",userxattr");
    }
    sys.chdir(base).map_err(|errno| SnapshotError::Mount {
        what: format!("chdir to {}", base.display()),
        errno,
    })?;
    let mut flags = MsFlags::empty();
    if spec.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    if spec.nodev {
        flags |= MsFlags::MS_NODEV;
    }
    sys.mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|errno| SnapshotError::Mount {
        what: format!("overlay on {}", target.display()),
        errno,
    })
}

/// Lowers that one overlay can stack. Past [`MAX_LOWERS`], the bottom ones are flattened into
/// one directory, their merged view copied once and cached beside the snapshot of the chain
/// they end with (`snapshots/<chain>/flat`), so a stage may have any number of layers.
/// `snapshots` is the shared snapshot directory the lowers live in, and `tmp` the store's
/// scratch on the same filesystem.
pub fn fit_lowers(
    lowers: &[PathBuf],
    snapshots: &Path,
    tmp: &Path,
) -> Result<Vec<PathBuf>, SnapshotError> {
    if lowers.len() <= MAX_LOWERS {
        return Ok(lowers.to_vec());
    }
    // Flatten the bottom-most layers in chunks of FLATTEN_CHUNK counted from the bottom, so
    // the next steps of the stage find the same flattened chunk cached; keep the rest (a
    // step's own skeleton among them) as they are.
    let must = lowers.len() - (MAX_LOWERS - 1);
    let chunk = must.div_ceil(FLATTEN_CHUNK) * FLATTEN_CHUNK;
    let keep = lowers.len() - chunk;
    let bottom = &lowers[keep..];
    let Some(chain_dir) = bottom[0].parent().filter(|d| d.starts_with(snapshots)) else {
        return Err(SnapshotError::Mount {
            what: format!(
                "an overlay of {} layers (overlayfs stacks at most {})",
                lowers.len(),
                MAX_LOWERS
            ),
            errno: nix::errno::Errno::E2BIG,
        });
    };
    let flat = chain_dir.join("flat");
    if !flat.is_dir() {
        let under = fit_lowers(bottom, snapshots, tmp)?;
        fs::create_dir_all(tmp).map_err(io_at(tmp))?;
        let view = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("flatten"))
            .tempdir_in(tmp)
            .map_err(io_at(tmp))?;
        let (merged, staged) = (view.path().join("merged"), view.path().join("fs"));
        fs::create_dir_all(&merged).map_err(io_at(&merged))?;
        let spec = OverlaySpec {
            lowers: under.clone(),
            upper_work: None,
            target: merged.clone(),
            readonly: true,
            nodev: false,
            userxattr: crate::worker::rootless(),
        };
        Host.mount_overlay_new_api(&spec)
            .map_err(|errno| SnapshotError::Mount {
                what: format!("a view of {} layers to flatten", under.len()),
                errno,
            })?;
        let copied = crate::worker::copy_tree(&merged, &staged);
        let _ = umount2(&merged, MntFlags::MNT_DETACH);
        copied.map_err(|e| SnapshotError::Mount {
            what: format!("flatten {} layers: {}", under.len(), e),
            errno: nix::errno::Errno::EIO,
        })?;
        // Another build may have flattened the same chain first: the contents are the same.
        if fs::rename(&staged, &flat).is_err() && !flat.is_dir() {
            return Err(io_at(&flat)(std::io::Error::other("cannot publish")));
        }
    }
    let mut out = lowers[..keep].to_vec();
    out.push(flat);
    Ok(out)
}

/// The shared snapshot directory of a store.
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
    tmp: PathBuf,
    blobs: BlobStore,
    /// Layers unpacked from their blobs so far, and those blobs' bytes (shared by clones).
    unpacked: Arc<crate::oci::Tally>,
    /// Where a layer's SBOM scan is kept, taken as it is unpacked (see [`Snapshots::scanning_into`]).
    scans: Option<PathBuf>,
}

impl Snapshots {
    /// Snapshots kept in `dir`, made through scratch in `tmp` (on the same filesystem).
    pub fn new(dir: &Path, tmp: &Path, blobs: &BlobStore) -> Snapshots {
        Snapshots {
            dir: dir.to_path_buf(),
            tmp: tmp.to_path_buf(),
            blobs: blobs.clone(),
            unpacked: Arc::default(),
            scans: None,
        }
    }

    /// Keep in `dir` the SBOM scan of each layer unpacked (unless one is kept already), so
    /// the image's SBOM never decompresses a base layer a second time.
    pub fn scanning_into(mut self, dir: &Path) -> Snapshots {
        self.scans = Some(dir.to_path_buf());
        self
    }

    /// Unpack `layer` (fetched if it is left at a registry) into `target`, verified against
    /// its diff_id, scanned for the SBOM on the way, and counted.
    fn unpack_layer(
        &self,
        layer: &LayerRef,
        target: &Path,
        opts: UnpackOptions,
    ) -> Result<(), SnapshotError> {
        use crate::attest::sbom;
        let scans = self
            .scans
            .as_deref()
            .filter(|d| !sbom::scan_path(d, &layer.diff_id).is_file());
        let mut scanner = sbom::StreamScanner::default();
        let mut skip = io::sink();
        let tee: &mut dyn io::Write = match scans {
            Some(_) => &mut scanner,
            None => &mut skip,
        };
        unpack::unpack_verified_teeing(
            &self.blobs.ensure(&layer.digest)?,
            &layer.digest.to_string(),
            target,
            opts,
            &layer.diff_id,
            tee,
        )?;
        if let (Some(dir), Some(scan)) = (scans, scanner.finish()) {
            sbom::store_scan(dir, &layer.diff_id, &scan);
        }
        self.unpacked.add(layer.size);
        Ok(())
    }

    /// How many layers were unpacked from their blobs so far (for a view or a copy), and
    /// how many bytes of blobs that read: what a step waited for before it could start.
    pub fn unpacked(&self) -> (u64, u64) {
        self.unpacked.get()
    }

    /// The directory snapshot paths are relative to in mount options.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Publish `dir` (already exactly `layer`, in overlay format: a COPY staging directory or
    /// a RUN upper directory) as the snapshot of `chain`, by rename: no second unpack.
    pub fn adopt(&self, chain: &Digest, dir: &Path) -> Result<PathBuf, SnapshotError> {
        let final_dir = self.dir.join(chain.hex());
        let fs_dir = final_dir.join("fs");
        if fs_dir.is_dir() {
            return Ok(fs_dir);
        }
        fs::create_dir_all(&self.dir).map_err(io_at(&self.dir))?;
        let staging = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("snapshot"))
            .tempdir_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        fs::rename(dir, staging.path().join("fs")).map_err(io_at(dir))?;
        self.publish(staging, &final_dir, "fs")
    }

    /// Rename a finished `staging/<name>` into place as `final_dir/<name>` (`fs`, or `meta`
    /// for a skeleton). A concurrent builder may have published the same first, which is
    /// fine: the contents are the same; the chain's directory may hold the other kind.
    fn publish(
        &self,
        staging: tempfile::TempDir,
        final_dir: &Path,
        name: &str,
    ) -> Result<PathBuf, SnapshotError> {
        let target = final_dir.join(name);
        let staged = staging.keep();
        let placed = match fs::rename(&staged, final_dir) {
            Ok(()) => Ok(()),
            Err(_) if target.is_dir() => Ok(()),
            Err(_) if final_dir.is_dir() => match fs::rename(staged.join(name), &target) {
                Err(_) if target.is_dir() => Ok(()),
                other => other,
            },
            Err(e) => Err(e),
        };
        if staged.exists() {
            let _ = fs::remove_dir_all(&staged);
        }
        placed.map_err(io_at(final_dir))?;
        crate::oci::blobs::sync_dir(&self.dir);
        Ok(target)
    }

    /// A skeleton of `layer` on top of `chain` ([`UnpackOptions::metadata_only`], overlay
    /// format), made once; the full snapshot when there is one (it serves as well).
    pub fn skeleton_dir(&self, chain: &Digest, layer: &LayerRef) -> Result<PathBuf, SnapshotError> {
        let final_dir = self.dir.join(chain.hex());
        for kind in ["fs", "meta"] {
            if final_dir.join(kind).is_dir() {
                return Ok(final_dir.join(kind));
            }
        }
        self.unpack_into(chain, layer, "meta")
    }

    /// Unpack `layer` (verified) into the chain's `name` directory.
    fn unpack_into(
        &self,
        chain: &Digest,
        layer: &LayerRef,
        name: &str,
    ) -> Result<PathBuf, SnapshotError> {
        let final_dir = self.dir.join(chain.hex());
        fs::create_dir_all(&self.dir).map_err(io_at(&self.dir))?;
        fs::create_dir_all(&self.tmp).map_err(io_at(&self.tmp))?;
        let staging = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("snapshot"))
            .tempdir_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        let fs_tmp = staging.path().join(name);
        fs::create_dir(&fs_tmp).map_err(io_at(&fs_tmp))?;
        self.unpack_layer(layer, &fs_tmp, snapshot_options(name))?;
        self.publish(staging, &final_dir, name)
    }

    /// An empty snapshot of the kind `need` asks for, to be filled from a layer's own tar
    /// stream as the layer is written ([`unpack::StreamUnpacker`]) and then published with
    /// [`Snapshots::publish_staged`] once the layer's chain is known.
    pub fn stage(&self, need: ViewNeed) -> Result<StagedSnapshot, SnapshotError> {
        fs::create_dir_all(&self.tmp).map_err(io_at(&self.tmp))?;
        let staging = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("snapshot"))
            .tempdir_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        let name = match need {
            ViewNeed::Full => "fs",
            ViewNeed::Metadata => "meta",
        };
        let dir = staging.path().join(name);
        fs::create_dir(&dir).map_err(io_at(&dir))?;
        Ok(StagedSnapshot {
            staging,
            name,
            options: snapshot_options(name),
            dir,
        })
    }

    /// Put a filled [`StagedSnapshot`] in place as the snapshot of `chain`.
    pub fn publish_staged(
        &self,
        chain: &Digest,
        staged: StagedSnapshot,
    ) -> Result<PathBuf, SnapshotError> {
        fs::create_dir_all(&self.dir).map_err(io_at(&self.dir))?;
        let final_dir = self.dir.join(chain.hex());
        self.publish(staged.staging, &final_dir, staged.name)
    }

    /// The overlay-format directory of `layer` on top of the chain `chain`, unpacking it once.
    pub fn layer_dir(&self, chain: &Digest, layer: &LayerRef) -> Result<PathBuf, SnapshotError> {
        let fs_dir = self.dir.join(chain.hex()).join("fs");
        if fs_dir.is_dir() {
            return Ok(fs_dir);
        }
        self.unpack_into(chain, layer, "fs")
    }
}

/// How a layer is unpacked as a snapshot: `fs` in full, `meta` as a skeleton.
fn snapshot_options(name: &str) -> UnpackOptions {
    UnpackOptions {
        devices: false,
        ownership: true,
        overlay_format: true,
        metadata_only: name == "meta",
        // A rootless overlay is mounted with `userxattr`.
        user_xattrs: crate::worker::rootless(),
        capability_xattr_only: false,
    }
}

/// A snapshot being made beside its layer ([`Snapshots::stage`]); removed unless published.
pub struct StagedSnapshot {
    staging: tempfile::TempDir,
    name: &'static str,
    /// How to unpack into [`StagedSnapshot::dir`], as a snapshot made from the blob would be.
    pub options: UnpackOptions,
    /// Where the layer's entries go.
    pub dir: PathBuf,
}

/// What a step reads of its root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewNeed {
    /// Names, types, modes, owners, links and small files: COPY, ADD and WORKDIR resolve
    /// their destination and users in it. Layers nobody has run on are unpacked as skeletons.
    Metadata,
    /// Every byte: RUN, COPY --from, bind mounts.
    Full,
}

/// A stage's root filesystem, read-only, as the solver reads it.
pub struct RootView {
    mode: Snapshotter,
    /// Overlay: the layer snapshot dirs, top first.
    lowers: Vec<PathBuf>,
    chains: Vec<Digest>,
    /// Some lower is a skeleton ([`ViewNeed::Metadata`]).
    skeletal: bool,
    mountpoint: tempfile::TempDir,
    mounted: bool,
    empty: tempfile::TempDir,
    /// The snapshot directory (mount options are relative to it).
    pub base: PathBuf,
    /// The store's scratch, where a deep stack is flattened.
    pub scratch: PathBuf,
}

/// Unpack the snapshots `layers` lack, each its own directory in overlay mode, on as many
/// threads as there are cores, biggest first: a base of several layers is ready in the time
/// of its biggest layer rather than of all of them in turn. Blobs left at a registry are
/// fetched ahead of the unpacks, up to four side by side, and each layer is unpacked as soon
/// as its blob is in: an empty runner's pull and unpack overlap instead of following each
/// other.
fn unpack_side_by_side(
    snaps: &Snapshots,
    layers: &[LayerRef],
    need: ViewNeed,
) -> Result<(), SnapshotError> {
    let mut missing: Vec<(Digest, &LayerRef)> = layers
        .iter()
        .zip(chain_ids(layers))
        .filter(|(_, chain)| {
            let dir = snaps.dir.join(chain.hex());
            !(dir.join("fs").is_dir() || need == ViewNeed::Metadata && dir.join("meta").is_dir())
        })
        .map(|(l, chain)| (chain, l))
        .collect();
    if missing.len() < 2 {
        return Ok(());
    }
    missing.sort_by_key(|(_, l)| std::cmp::Reverse(l.size));
    let ready: Vec<bool> = missing
        .iter()
        .map(|(_, l)| snaps.blobs.contains(&l.digest))
        .collect();
    let fetches: Vec<usize> = (0..missing.len()).filter(|&i| !ready[i]).collect();
    let board = FetchBoard {
        state: std::sync::Mutex::new(BoardState {
            ready,
            taken: vec![false; missing.len()],
            failed: None,
        }),
        changed: std::sync::Condvar::new(),
    };
    let fetch_next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(missing.len());
    std::thread::scope(|s| {
        for _ in 0..fetches.len().min(4) {
            s.spawn(|| loop {
                // Should a fetch panic, the unpacks waiting for it stop instead of hanging.
                let _watch = PanicStops(&board, &snaps.tmp);
                let k = fetch_next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = fetches.get(k) else { break };
                if board.stopped() {
                    break;
                }
                let fetched = snaps.blobs.ensure(&missing[i].1.digest);
                board.update(|st| match fetched {
                    Ok(_) => st.ready[i] = true,
                    Err(e) => {
                        st.failed.get_or_insert(e.into());
                    }
                });
            });
        }
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(i) = board.claim() {
                    let (chain, layer) = &missing[i];
                    let done = match need {
                        ViewNeed::Full => snaps.layer_dir(chain, layer),
                        ViewNeed::Metadata => snaps.skeleton_dir(chain, layer),
                    };
                    if let Err(e) = done {
                        // The others stop at their next layer.
                        board.update(|st| {
                            st.failed.get_or_insert(e);
                        });
                        break;
                    }
                }
            });
        }
    });
    match board.state.into_inner() {
        Ok(BoardState {
            failed: Some(e), ..
        }) => Err(e),
        _ => Ok(()),
    }
}

/// Which of [`unpack_side_by_side`]'s layers have their blob in, which are being unpacked,
/// and the first failure (after which nothing new starts).
struct BoardState {
    ready: Vec<bool>,
    taken: Vec<bool>,
    failed: Option<SnapshotError>,
}

struct FetchBoard {
    state: std::sync::Mutex<BoardState>,
    changed: std::sync::Condvar,
}

/// Marks the board failed if dropped while its thread panics.
struct PanicStops<'b>(&'b FetchBoard, &'b Path);

impl Drop for PanicStops<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let path = self.1.to_path_buf();
            self.0.update(|st| {
                st.failed.get_or_insert(SnapshotError::Io {
                    path,
                    source: io::Error::other("a layer fetch panicked"),
                });
            });
        }
    }
}

impl FetchBoard {
    fn update(&self, f: impl FnOnce(&mut BoardState)) {
        if let Ok(mut st) = self.state.lock() {
            f(&mut st);
        }
        self.changed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.state.lock().map_or(true, |st| st.failed.is_some())
    }

    /// The next layer to unpack, biggest first of those whose blob is in (waiting for one
    /// to come in); `None` once all are taken or something failed.
    fn claim(&self) -> Option<usize> {
        let mut st = self.state.lock().ok()?;
        loop {
            if st.failed.is_some() || st.taken.iter().all(|t| *t) {
                return None;
            }
            if let Some(i) = (0..st.ready.len()).find(|&i| st.ready[i] && !st.taken[i]) {
                st.taken[i] = true;
                return Some(i);
            }
            st = self.changed.wait(st).ok()?;
        }
    }
}

impl RootView {
    /// A view of `layers` (bottom first).
    pub fn new(
        snaps: &Snapshots,
        mode: Snapshotter,
        layers: &[LayerRef],
    ) -> Result<RootView, SnapshotError> {
        RootView::for_need(snaps, mode, layers, ViewNeed::Full)
    }

    /// A view of `layers` that shows at least what `need` says.
    pub fn for_need(
        snaps: &Snapshots,
        mode: Snapshotter,
        layers: &[LayerRef],
        need: ViewNeed,
    ) -> Result<RootView, SnapshotError> {
        let mountpoint = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("view"))
            .tempdir_in(&snaps.tmp)
            .map_err(io_at(&snaps.tmp))?;
        let empty = tempfile::Builder::new()
            .prefix(&crate::oci::blobs::scratch_prefix("empty"))
            .tempdir_in(&snaps.tmp)
            .map_err(io_at(&snaps.tmp))?;
        fs::create_dir_all(&snaps.dir).map_err(io_at(&snaps.dir))?;
        if mode == Snapshotter::Overlay {
            // Layers left at a registry are fetched as they are unpacked (a single missing
            // layer, in `push` below).
            unpack_side_by_side(snaps, layers, need)?;
        } else {
            // Every layer is unpacked into the copy: all come in side by side first.
            let digests: Vec<Digest> = layers.iter().map(|l| l.digest.clone()).collect();
            snaps.blobs.ensure_all(&digests)?;
        }
        let mut v = RootView {
            mode,
            lowers: Vec::new(),
            chains: Vec::new(),
            skeletal: false,
            mountpoint,
            mounted: false,
            empty,
            base: snaps.dir.clone(),
            scratch: snaps.tmp.clone(),
        };
        for l in layers {
            v.push(snaps, l, need)?;
        }
        v.remount()?;
        Ok(v)
    }

    /// Where the merged tree is.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// The snapshot dirs, top first (overlay mode).
    pub fn lowers(&self) -> &[PathBuf] {
        &self.lowers
    }

    /// How many layers the view shows.
    pub fn layer_count(&self) -> usize {
        self.chains.len()
    }

    pub fn mode(&self) -> Snapshotter {
        self.mode
    }

    fn push(
        &mut self,
        snaps: &Snapshots,
        layer: &LayerRef,
        need: ViewNeed,
    ) -> Result<(), SnapshotError> {
        let mut chain = self.chains.clone();
        let next = next_chain(chain.last(), &layer.diff_id);
        chain.push(next.clone());
        match self.mode {
            Snapshotter::Overlay => {
                let dir = match need {
                    ViewNeed::Full => snaps.layer_dir(&next, layer)?,
                    ViewNeed::Metadata => snaps.skeleton_dir(&next, layer)?,
                };
                self.skeletal |= !dir.ends_with("fs");
                self.lowers.insert(0, dir);
            }
            Snapshotter::Copy => {
                let opts = UnpackOptions {
                    devices: false,
                    ownership: nix::unistd::geteuid().is_root(),
                    overlay_format: false,
                    metadata_only: false,
                    user_xattrs: false,
                    capability_xattr_only: false,
                };
                snaps.unpack_layer(layer, self.mountpoint.path(), opts)?;
            }
        }
        self.chains = chain;
        Ok(())
    }

    /// Bring the view up to `layers` (a view only ever grows by the layers its stage adds).
    pub fn sync(&mut self, snaps: &Snapshots, layers: &[LayerRef]) -> Result<(), SnapshotError> {
        self.sync_for(snaps, layers, ViewNeed::Full)
    }

    /// [`RootView::sync`] for a step that needs `need`: a skeletal view a step needs in full
    /// is made again from full snapshots.
    pub fn sync_for(
        &mut self,
        snaps: &Snapshots,
        layers: &[LayerRef],
        need: ViewNeed,
    ) -> Result<(), SnapshotError> {
        let chains = chain_ids(layers);
        if chains.len() < self.chains.len()
            || chains[..self.chains.len()] != self.chains[..]
            || (need == ViewNeed::Full && self.skeletal)
        {
            *self = RootView::for_need(snaps, self.mode, layers, need)?;
            return Ok(());
        }
        let new = &layers[self.chains.len()..];
        if new.is_empty() {
            return Ok(());
        }
        self.unmount();
        for l in new {
            self.push(snaps, l, need)?;
        }
        self.remount()
    }

    /// Put one more layer on top whose content is already laid out in `dir` (which is
    /// consumed). With the copy snapshotter the layer is applied from the blob as usual.
    pub fn add_layer_from_dir(
        &mut self,
        snaps: &Snapshots,
        layer: &LayerRef,
        dir: &Path,
    ) -> Result<(), SnapshotError> {
        if self.mode != Snapshotter::Overlay {
            return self.add_layer(snaps, layer);
        }
        let next = next_chain(self.chains.last(), &layer.diff_id);
        self.unmount();
        let fs_dir = snaps.adopt(&next, dir)?;
        self.lowers.insert(0, fs_dir);
        self.chains.push(next);
        self.remount()
    }

    /// Put one more layer on top.
    pub fn add_layer(&mut self, snaps: &Snapshots, layer: &LayerRef) -> Result<(), SnapshotError> {
        self.unmount();
        self.push(snaps, layer, ViewNeed::Full)?;
        self.remount()
    }

    /// Lay `dir`, an overlay upper directory (a failed step's writes), over the view as
    /// its top layer, read-only. Overlay mode only; the view is not synced after.
    pub fn lay_over(&mut self, dir: &Path) -> Result<(), SnapshotError> {
        self.unmount();
        self.lowers.insert(0, dir.to_path_buf());
        self.remount()
    }

    fn remount(&mut self) -> Result<(), SnapshotError> {
        if self.mode != Snapshotter::Overlay || self.lowers.is_empty() {
            return Ok(());
        }
        let mut lowers = self.lowers.clone();
        if lowers.len() == 1 {
            // A read-only overlay needs two lower directories.
            lowers.push(self.empty.path().to_path_buf());
        }
        // The working directory is process-wide: one view mount at a time.
        let _cwd_guard = MOUNT_CWD.lock().unwrap_or_else(|e| e.into_inner());
        let cwd = std::env::current_dir().map_err(io_at(&self.base))?;
        let r = mount_overlay(
            &lowers,
            None,
            self.mountpoint.path(),
            true,
            false,
            &self.base,
            &self.scratch,
        );
        std::env::set_current_dir(&cwd).map_err(io_at(&cwd))?;
        r?;
        self.mounted = true;
        Ok(())
    }

    fn unmount(&mut self) {
        if self.mounted {
            let _ = umount2(self.mountpoint.path(), MntFlags::MNT_DETACH);
            self.mounted = false;
        }
    }
}

impl Drop for RootView {
    fn drop(&mut self) {
        self.unmount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::syscall::{Call, Recorder};
    use nix::errno::Errno;

    fn spec(base: &Path, upper: bool) -> OverlaySpec {
        OverlaySpec {
            lowers: vec![
                base.join("c2/fs"),
                base.join("c1/fs"),
                "/elsewhere/fs".into(),
            ],
            upper_work: upper.then(|| ("/s/upper".into(), "/s/work".into())),
            target: "/s/merged".into(),
            readonly: !upper,
            nodev: true,
            userxattr: false,
        }
    }

    #[test]
    fn a_private_mount_namespace_is_unshared_then_made_private() {
        let sys = Recorder::default();
        enter_private_mount_namespace_with(&sys).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], Call::Unshare(nix::sched::CloneFlags::CLONE_NEWNS));
        assert!(matches!(&calls[1], Call::Mount { target, flags, .. }
            if target == Path::new("/") && *flags == MsFlags::MS_REC | MsFlags::MS_PRIVATE));
        let refused = Recorder::default().fail("Unshare", Errno::EPERM);
        let e = enter_private_mount_namespace_with(&refused).unwrap_err();
        assert!(e.to_string().contains("private mount namespace"), "{e}");
        assert_eq!(
            refused.calls().len(),
            1,
            "nothing is mounted after a refusal"
        );
    }

    #[test]
    fn the_new_mount_api_is_used_when_the_kernel_has_it() {
        let base = Path::new("/store/snapshots");
        let sys = Recorder::default();
        mount_overlay_with(&sys, &spec(base, true), base).unwrap();
        assert_eq!(sys.calls(), [Call::OverlayNewApi(spec(base, true))]);
    }

    #[test]
    fn older_kernels_get_mount_with_lowers_relative_to_the_base() {
        let base = Path::new("/store/snapshots");
        for errno in [Errno::ENOSYS, Errno::EINVAL] {
            let sys = Recorder::default().fail("OverlayNewApi", errno);
            mount_overlay_with(&sys, &spec(base, true), base).unwrap();
            let calls = sys.calls();
            assert_eq!(calls[1], Call::Chdir(base.to_path_buf()));
            let Call::Mount {
                fstype,
                flags,
                data,
                target,
                ..
            } = &calls[2]
            else {
                panic!("no mount: {calls:?}")
            };
            assert_eq!(fstype.as_deref(), Some("overlay"));
            assert_eq!(target, Path::new("/s/merged"));
            assert_eq!(*flags, MsFlags::MS_NODEV);
            assert_eq!(
                data.as_deref(),
                Some("lowerdir=c2/fs:c1/fs:/elsewhere/fs,upperdir=/s/upper,workdir=/s/work")
            );
        }
        // Read-only, rootless.
        let sys = Recorder::default().fail("OverlayNewApi", Errno::ENOSYS);
        let mut ro = spec(base, false);
        ro.userxattr = true;
        mount_overlay_with(&sys, &ro, base).unwrap();
        assert!(
            matches!(&sys.calls()[2], Call::Mount { flags, data: Some(d), .. }
            if *flags == MsFlags::MS_RDONLY | MsFlags::MS_NODEV && d.ends_with(",userxattr") && !d.contains("upperdir"))
        );
    }

    #[test]
    fn another_refusal_of_the_new_api_is_an_error_naming_the_overlay() {
        let base = Path::new("/store/snapshots");
        let sys = Recorder::default().fail("OverlayNewApi", Errno::EPERM);
        let e = mount_overlay_with(&sys, &spec(base, true), base).unwrap_err();
        assert!(
            e.to_string()
                .contains("an overlay of 3 layers on /s/merged"),
            "{e}"
        );
        assert_eq!(sys.calls().len(), 1, "no fallback after EPERM");
    }
}
