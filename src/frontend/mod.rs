//! The frontend: what is read from a build file before anything runs. Today it holds the build
//! checks (BuildKit's lint rules), run on the parsed file; the lowering to stages lives in
//! `plan`.

pub mod checks;
