//! SMART App Launch scopes (v1 and v2 syntax) and their enforcement semantics.
//!
//! Grammar (v2): `(patient|user|system)/(ResourceType|*).[c][r][u][d][s][?param=value(&param=value)*]`,
//! letters a non-empty subset of `cruds` in that order. v1: `.read` (= `rs`), `.write` (= `cud`),
//! `.*` (= `cruds`). Strings that look like resource scopes but are malformed (`.dus`, `.sr`,
//! unknown context) are rejected, never misread.

use std::fmt;

/// Permission bits of a resource scope.
pub const PERM_CREATE: u8 = 1;
pub const PERM_READ: u8 = 2;
pub const PERM_UPDATE: u8 = 4;
pub const PERM_DELETE: u8 = 8;
pub const PERM_SEARCH: u8 = 16;
pub const PERM_ALL: u8 = 31;

/// The context prefix of a resource scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

impl ScopeContext {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        }
    }
}

/// A FHIR RESTful interaction, as the resource server classifies a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Read,
    VRead,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Search,
    Create,
    Update,
    Patch,
    Delete,
}

impl Interaction {
    /// The SMART v2 permission letter that covers this interaction.
    pub fn permission(self) -> u8 {
        match self {
            Interaction::Create => PERM_CREATE,
            Interaction::Read | Interaction::VRead | Interaction::HistoryInstance => PERM_READ,
            Interaction::Update | Interaction::Patch => PERM_UPDATE,
            Interaction::Delete => PERM_DELETE,
            Interaction::Search | Interaction::HistoryType | Interaction::HistorySystem => {
                PERM_SEARCH
            }
        }
    }
}

/// A resource-level (`patient/Observation.rs`) scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: ScopeContext,
    /// Resource type, or `*`.
    pub resource_type: String,
    /// Bit set of `PERM_*`.
    pub permissions: u8,
    /// Granular query parameters (`?category=laboratory`), AND-combined; empty = whole type.
    pub filter: Vec<(String, String)>,
    /// Written in v1 syntax (`.read`, `.write`, `.*`).
    pub v1: bool,
}

impl ResourceScope {
    pub fn matches_type(&self, resource_type: &str) -> bool {
        self.resource_type == "*" || self.resource_type == resource_type
    }

    /// Does `self` grant everything `other` asks for?
    pub fn covers(&self, other: &ResourceScope) -> bool {
        self.context == other.context
            && (self.resource_type == "*" || self.resource_type == other.resource_type)
            && (other.permissions & !self.permissions) == 0
            && (self.filter.is_empty() || self.filter == other.filter)
    }

    fn letters(&self) -> String {
        let mut s = String::new();
        for (bit, c) in [
            (PERM_CREATE, 'c'),
            (PERM_READ, 'r'),
            (PERM_UPDATE, 'u'),
            (PERM_DELETE, 'd'),
            (PERM_SEARCH, 's'),
        ] {
            if self.permissions & bit != 0 {
                s.push(c);
            }
        }
        s
    }
}

impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}.", self.context.as_str(), self.resource_type)?;
        if self.v1 {
            let p = match self.permissions {
                PERM_ALL => "*",
                x if x == PERM_READ | PERM_SEARCH => "read",
                x if x == PERM_CREATE | PERM_UPDATE | PERM_DELETE => "write",
                _ => "",
            };
            if !p.is_empty() {
                return f.write_str(p);
            }
        }
        f.write_str(&self.letters())?;
        for (i, (k, v)) in self.filter.iter().enumerate() {
            write!(f, "{}{}={}", if i == 0 { '?' } else { '&' }, k, v)?;
        }
        Ok(())
    }
}

/// One scope token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Resource(ResourceScope),
    OpenId,
    FhirUser,
    Profile,
    Launch,
    LaunchPatient,
    LaunchEncounter,
    OfflineAccess,
    OnlineAccess,
    /// Any other well-formed token (e.g. `email`, `launch/xyz`): kept but carries no FHIR access.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope '{0}': {1}")]
pub struct ScopeError(pub String, pub &'static str);

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let err = |why| ScopeError(s.to_string(), why);
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
        {
            return Err(err("illegal character"));
        }
        Ok(match s {
            "openid" => Scope::OpenId,
            "fhirUser" => Scope::FhirUser,
            "profile" => Scope::Profile,
            "launch" => Scope::Launch,
            "launch/patient" => Scope::LaunchPatient,
            "launch/encounter" => Scope::LaunchEncounter,
            "offline_access" => Scope::OfflineAccess,
            "online_access" => Scope::OnlineAccess,
            _ => {
                let Some((ctx, rest)) = s.split_once('/') else {
                    return Ok(Scope::Other(s.to_string()));
                };
                let context = match ctx {
                    "patient" => ScopeContext::Patient,
                    "user" => ScopeContext::User,
                    "system" => ScopeContext::System,
                    "launch" => return Ok(Scope::Other(s.to_string())),
                    _ => return Err(err("unknown scope context")),
                };
                Scope::Resource(parse_resource_scope(context, rest).map_err(err)?)
            }
        })
    }
}

fn parse_resource_scope(context: ScopeContext, rest: &str) -> Result<ResourceScope, &'static str> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (rt, perm) = path.split_once('.').ok_or("missing '.' permissions")?;
    let rt_ok = rt == "*"
        || (rt.starts_with(|c: char| c.is_ascii_uppercase())
            && rt.chars().all(|c| c.is_ascii_alphanumeric()));
    if !rt_ok {
        return Err("invalid resource type");
    }
    let (permissions, v1) = match perm {
        "read" => (PERM_READ | PERM_SEARCH, true),
        "write" => (PERM_CREATE | PERM_UPDATE | PERM_DELETE, true),
        "*" => (PERM_ALL, true),
        _ => {
            if perm.is_empty() {
                return Err("empty permissions");
            }
            let order = ['c', 'r', 'u', 'd', 's'];
            let mut bits = 0u8;
            let mut next = 0usize;
            for ch in perm.chars() {
                let pos = order
                    .iter()
                    .position(|&o| o == ch)
                    .ok_or("unknown permission letter")?;
                if pos < next {
                    return Err("permission letters out of order or repeated");
                }
                next = pos + 1;
                bits |= 1 << pos;
            }
            (bits, false)
        }
    };
    let mut filter = Vec::new();
    if let Some(q) = query {
        if v1 {
            return Err("granular parameters need v2 permissions");
        }
        if q.is_empty() {
            return Err("empty query");
        }
        for part in q.split('&') {
            let (k, v) = part.split_once('=').ok_or("parameter without '='")?;
            if k.is_empty() || v.is_empty() {
                return Err("empty parameter name or value");
            }
            filter.push((k.to_string(), v.to_string()));
        }
    }
    Ok(ResourceScope {
        context,
        resource_type: rt.to_string(),
        permissions,
        filter,
        v1,
    })
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Resource(r) => r.fmt(f),
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::Profile => f.write_str("profile"),
            Scope::Launch => f.write_str("launch"),
            Scope::LaunchPatient => f.write_str("launch/patient"),
            Scope::LaunchEncounter => f.write_str("launch/encounter"),
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::OnlineAccess => f.write_str("online_access"),
            Scope::Other(s) => f.write_str(s),
        }
    }
}

impl Scope {
    /// Does `self` grant everything `other` asks for?
    pub fn covers(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Resource(a), Scope::Resource(b)) => a.covers(b),
            (a, b) => a == b,
        }
    }
}

/// A parsed, de-duplicated list of scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(pub Vec<Scope>);

impl ScopeSet {
    /// Parses a space-separated scope string, rejecting the whole string on any malformed token.
    pub fn parse_strict(s: &str) -> Result<ScopeSet, ScopeError> {
        let mut out = ScopeSet::default();
        for tok in s.split(' ').filter(|t| !t.is_empty()) {
            out.push(Scope::parse(tok)?);
        }
        Ok(out)
    }

    /// Parses a scope string, dropping malformed tokens (returned separately).
    pub fn parse_lenient(s: &str) -> (ScopeSet, Vec<ScopeError>) {
        let mut out = ScopeSet::default();
        let mut errors = Vec::new();
        for tok in s.split(' ').filter(|t| !t.is_empty()) {
            match Scope::parse(tok) {
                Ok(sc) => out.push(sc),
                Err(e) => errors.push(e),
            }
        }
        (out, errors)
    }

    pub fn push(&mut self, s: Scope) {
        if !self.0.contains(&s) {
            self.0.push(s);
        }
    }

    pub fn contains(&self, s: &Scope) -> bool {
        self.0.contains(s)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn resource_scopes(&self) -> impl Iterator<Item = &ResourceScope> {
        self.0.iter().filter_map(|s| match s {
            Scope::Resource(r) => Some(r),
            _ => None,
        })
    }

    pub fn has_context(&self, ctx: ScopeContext) -> bool {
        self.resource_scopes().any(|r| r.context == ctx)
    }

    /// Is every scope of `self` covered by some scope of `allowed`?
    pub fn is_subset_of(&self, allowed: &ScopeSet) -> bool {
        self.0.iter().all(|s| allowed.0.iter().any(|a| a.covers(s)))
    }

    /// The scopes of `self` that are covered by `allowed`.
    pub fn restrict_to(&self, allowed: &ScopeSet) -> ScopeSet {
        ScopeSet(
            self.0
                .iter()
                .filter(|s| allowed.0.iter().any(|a| a.covers(s)))
                .cloned()
                .collect(),
        )
    }

    /// Evaluates the resource scopes for one interaction on one resource type.
    pub fn filter_for(&self, interaction: Interaction, resource_type: &str) -> ScopeFilter {
        let bit = interaction.permission();
        let mut sets = Vec::new();
        for r in self.resource_scopes() {
            if r.permissions & bit != 0 && r.matches_type(resource_type) {
                if r.filter.is_empty() {
                    return ScopeFilter::Unrestricted;
                }
                sets.push(r.filter.clone());
            }
        }
        if sets.is_empty() {
            ScopeFilter::Denied
        } else {
            ScopeFilter::AnyOf(sets)
        }
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            s.fmt(f)?;
        }
        Ok(())
    }
}

/// What the granted scopes allow for one interaction on one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeFilter {
    /// No scope allows it.
    Denied,
    /// A whole-type scope allows it.
    Unrestricted,
    /// Only granular scopes allow it: results must match at least one of these parameter sets
    /// (parameters inside one set are AND-combined).
    AnyOf(Vec<Vec<(String, String)>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(s: &str) -> ResourceScope {
        match Scope::parse(s).unwrap() {
            Scope::Resource(r) => r,
            other => panic!("not a resource scope: {other:?}"),
        }
    }

    #[test]
    fn parse_table() {
        let cases: &[(&str, ScopeContext, &str, u8, bool)] = &[
            (
                "patient/*.read",
                ScopeContext::Patient,
                "*",
                PERM_READ | PERM_SEARCH,
                true,
            ),
            (
                "user/Observation.write",
                ScopeContext::User,
                "Observation",
                PERM_CREATE | PERM_UPDATE | PERM_DELETE,
                true,
            ),
            ("system/*.*", ScopeContext::System, "*", PERM_ALL, true),
            (
                "patient/Observation.rs",
                ScopeContext::Patient,
                "Observation",
                PERM_READ | PERM_SEARCH,
                false,
            ),
            (
                "user/Patient.cruds",
                ScopeContext::User,
                "Patient",
                PERM_ALL,
                false,
            ),
            (
                "system/Group.r",
                ScopeContext::System,
                "Group",
                PERM_READ,
                false,
            ),
            (
                "patient/Condition.cud",
                ScopeContext::Patient,
                "Condition",
                PERM_CREATE | PERM_UPDATE | PERM_DELETE,
                false,
            ),
            ("user/*.s", ScopeContext::User, "*", PERM_SEARCH, false),
        ];
        for (s, ctx, rt, perms, v1) in cases {
            let r = rs(s);
            assert_eq!(r.context, *ctx, "{s}");
            assert_eq!(r.resource_type, *rt, "{s}");
            assert_eq!(r.permissions, *perms, "{s}");
            assert_eq!(r.v1, *v1, "{s}");
            assert_eq!(r.to_string(), *s, "round trip {s}");
        }
    }

    #[test]
    fn granular_scope() {
        let r = rs("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory");
        assert_eq!(r.filter.len(), 1);
        assert_eq!(r.filter[0].0, "category");
        assert!(r.filter[0].1.ends_with("|laboratory"));
        let r = rs("user/Condition.rs?category=problem-list-item&clinical-status=active");
        assert_eq!(r.filter.len(), 2);
        assert_eq!(
            r.to_string(),
            "user/Condition.rs?category=problem-list-item&clinical-status=active"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "patient/Observation.dus",
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.x",
            "patient/Observation.",
            "patient/Observation",
            "patient/observation.rs",
            "doctor/Observation.rs",
            "patient/Observation.read?category=x",
            "patient/Observation.rs?",
            "patient/Observation.rs?category",
            "",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn special_scopes() {
        let set = ScopeSet::parse_strict(
            "openid fhirUser profile launch launch/patient launch/encounter offline_access online_access email",
        )
        .unwrap();
        assert_eq!(
            set.0,
            vec![
                Scope::OpenId,
                Scope::FhirUser,
                Scope::Profile,
                Scope::Launch,
                Scope::LaunchPatient,
                Scope::LaunchEncounter,
                Scope::OfflineAccess,
                Scope::OnlineAccess,
                Scope::Other("email".into())
            ]
        );
    }

    #[test]
    fn lenient_drops_bad_tokens() {
        let (set, errs) =
            ScopeSet::parse_lenient("openid patient/Observation.dus  patient/Patient.r");
        assert_eq!(set.to_string(), "openid patient/Patient.r");
        assert_eq!(errs.len(), 1);
        assert!(ScopeSet::parse_strict("openid patient/Observation.dus").is_err());
    }

    #[test]
    fn covers_and_subset() {
        let granted =
            ScopeSet::parse_strict("patient/*.read user/Observation.rs?category=laboratory openid")
                .unwrap();
        for (req, ok) in [
            ("patient/Observation.rs", true),
            ("patient/Observation.r", true),
            ("patient/Observation.c", false),
            ("user/Observation.rs", false),
            ("user/Observation.r?category=laboratory", true),
            ("user/Observation.rs?category=vital-signs", false),
            ("openid", true),
            ("fhirUser", false),
            ("system/Observation.r", false),
        ] {
            let s = ScopeSet::parse_strict(req).unwrap();
            assert_eq!(s.is_subset_of(&granted), ok, "{req}");
        }
    }

    #[test]
    fn filter_for_interactions() {
        let g = ScopeSet::parse_strict(
            "patient/Patient.r patient/Observation.rs?category=laboratory patient/Observation.s?category=vital-signs user/Encounter.cruds",
        )
        .unwrap();
        assert_eq!(
            g.filter_for(Interaction::Read, "Patient"),
            ScopeFilter::Unrestricted
        );
        assert_eq!(
            g.filter_for(Interaction::VRead, "Patient"),
            ScopeFilter::Unrestricted
        );
        assert_eq!(
            g.filter_for(Interaction::Search, "Patient"),
            ScopeFilter::Denied
        );
        assert_eq!(
            g.filter_for(Interaction::Update, "Patient"),
            ScopeFilter::Denied
        );
        assert_eq!(
            g.filter_for(Interaction::Search, "Observation"),
            ScopeFilter::AnyOf(vec![
                vec![("category".into(), "laboratory".into())],
                vec![("category".into(), "vital-signs".into())]
            ])
        );
        assert_eq!(
            g.filter_for(Interaction::Delete, "Encounter"),
            ScopeFilter::Unrestricted
        );
        assert_eq!(
            g.filter_for(Interaction::Patch, "Encounter"),
            ScopeFilter::Unrestricted
        );
        assert_eq!(
            g.filter_for(Interaction::Read, "Condition"),
            ScopeFilter::Denied
        );
    }
}
