//! COPY's `--chown` and `--chmod`, typed when the build file is lowered: a bad value is an
//! error at its line, and the solver applies values, never parses them. Names in `--chown`
//! stay names: only the image's `/etc/passwd` and `/etc/group` can resolve them, at run time.

use serde::Serialize;

/// The highest id `--chown` accepts: `(uid_t)-1` means "leave unchanged" to chown(2), never
/// an owner.
pub const MAX_ID: u64 = u32::MAX as u64 - 1;

/// A user or a group as written: a number, or a name to look up in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Id {
    Number(u32),
    Name(String),
}

impl Id {
    /// `what` (user or group) as written; a number out of range is an error, not a name.
    pub fn parse(what: &str, s: &str) -> Result<Id, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Id::Name(s.to_string()));
        }
        match s.parse::<u64>() {
            Ok(n) if n <= MAX_ID => Ok(Id::Number(n as u32)),
            _ => Err(format!(
                "invalid {} id {}: ids go from 0 to {}",
                what, s, MAX_ID
            )),
        }
    }
}

/// `--chown=user[:group]`. Without a group, the user's numeric id is the group, as docker
/// does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chown {
    pub user: Id,
    pub group: Option<Id>,
}

impl Chown {
    pub fn parse(spec: &str) -> Result<Chown, String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        Ok(Chown {
            user: Id::parse("user", user)?,
            group: group.map(|g| Id::parse("group", g)).transpose()?,
        })
    }
}

/// `--chmod`: an octal mode, or symbolic clauses (`u+x,go-w`, `a=rX`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Chmod {
    Octal(u32),
    Symbolic(Vec<ChmodClause>),
}

/// One clause of a symbolic `--chmod`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChmodClause {
    /// The bits the clause may touch (from `u`, `g`, `o`, `a`).
    pub who: u32,
    pub op: ChmodOp,
    /// The bits it names (`r`, `w`, `x`, `s`, `t`), before `who` masks them.
    pub bits: u32,
    /// `X`: execute, only for directories and files that some already execute.
    pub conditional_x: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChmodOp {
    Add,
    Remove,
    Set,
}

impl Chmod {
    pub fn parse(spec: &str) -> Result<Chmod, String> {
        if let Ok(m) = u32::from_str_radix(spec, 8) {
            if m > 0o7777 {
                return Err(format!("invalid --chmod {:?}: above 7777", spec));
            }
            return Ok(Chmod::Octal(m));
        }
        let mut clauses = Vec::new();
        for clause in spec.split(',') {
            let op_pos = clause
                .find(['+', '-', '='])
                .ok_or_else(|| format!("invalid --chmod {:?}", spec))?;
            let (who_text, rest) = clause.split_at(op_pos);
            let op = match rest.as_bytes()[0] {
                b'+' => ChmodOp::Add,
                b'-' => ChmodOp::Remove,
                _ => ChmodOp::Set,
            };
            let mut who = 0u32;
            for w in if who_text.is_empty() { "a" } else { who_text }.chars() {
                who |= match w {
                    'u' => 0o4700,
                    'g' => 0o2070,
                    'o' => 0o0007,
                    'a' => 0o6777,
                    _ => return Err(format!("invalid --chmod {:?}: unknown who {:?}", spec, w)),
                };
            }
            let (mut bits, mut conditional_x) = (0u32, false);
            for p in rest[1..].chars() {
                match p {
                    'r' => bits |= 0o444,
                    'w' => bits |= 0o222,
                    'x' => bits |= 0o111,
                    'X' => conditional_x = true,
                    's' => bits |= 0o6000,
                    't' => bits |= 0o1000,
                    _ => {
                        return Err(format!(
                            "invalid --chmod {:?}: unknown permission {:?}",
                            spec, p
                        ))
                    }
                }
            }
            clauses.push(ChmodClause {
                who,
                op,
                bits,
                conditional_x,
            });
        }
        Ok(Chmod::Symbolic(clauses))
    }

    /// The mode a file of `mode` gets (`is_dir` for `X`).
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Chmod::Octal(m) => return *m,
            Chmod::Symbolic(c) => c,
        };
        let mut mode = mode & 0o7777;
        for c in clauses {
            let mut bits = c.bits;
            if c.conditional_x && (is_dir || mode & 0o111 != 0) {
                bits |= 0o111;
            }
            let bits = bits & c.who;
            mode = match c.op {
                ChmodOp::Add => mode | bits,
                ChmodOp::Remove => mode & !bits,
                ChmodOp::Set => (mode & !c.who) | bits,
            };
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chmod_forms() {
        let apply = |s: &str, mode, dir| Chmod::parse(s).unwrap().apply(mode, dir);
        assert_eq!(apply("755", 0o644, false), 0o755);
        assert_eq!(apply("u+x", 0o644, false), 0o744);
        assert_eq!(apply("go-r", 0o644, false), 0o600);
        assert_eq!(apply("a=rX", 0o700, true), 0o555);
        assert_eq!(apply("a=rX", 0o600, false), 0o444);
        assert_eq!(apply("+X", 0o744, false), 0o755);
        assert!(Chmod::parse("z+q").is_err());
        assert!(Chmod::parse("u+q").is_err());
        assert!(Chmod::parse("17777").is_err());
    }

    #[test]
    fn chown_forms() {
        assert_eq!(
            Chown::parse("app:staff").unwrap(),
            Chown {
                user: Id::Name("app".into()),
                group: Some(Id::Name("staff".into()))
            }
        );
        assert_eq!(
            Chown::parse("10").unwrap(),
            Chown {
                user: Id::Number(10),
                group: None
            }
        );
        assert_eq!(
            Chown::parse("4294967294:0").unwrap().user,
            Id::Number(u32::MAX - 1)
        );
        for bad in ["4294967295", "1:4294967295", "99999999999999999999"] {
            let e = Chown::parse(bad).unwrap_err();
            assert!(e.contains("ids go from 0 to 4294967294"), "{e}");
        }
    }
}
