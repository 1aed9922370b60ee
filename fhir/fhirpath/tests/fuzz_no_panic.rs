//! Deterministic "token soup" fuzzing: random expressions built from FHIRPath tokens must never
//! panic (errors are fine), on a realistic resource.

use kiln_fhirpath::{evaluate, Context, Expression};
use serde_json::json;

const TOKENS: &[&str] = &[
    "Patient",
    "name",
    "given",
    "family",
    "birthDate",
    "telecom",
    "value",
    "extension",
    "contained",
    "id",
    "active",
    ".",
    ".",
    ".",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "+",
    "-",
    "*",
    "/",
    "div",
    "mod",
    "&",
    "|",
    "=",
    "~",
    "!=",
    "!~",
    "<",
    ">",
    "<=",
    ">=",
    "and",
    "or",
    "xor",
    "implies",
    "in",
    "contains",
    "is",
    "as",
    "Quantity",
    "String",
    "System.Integer",
    "FHIR.code",
    "$this",
    "$index",
    "$total",
    "%resource",
    "%context",
    "%ucum",
    "%x",
    "1",
    "0",
    "-1",
    "2.5",
    "9999999999999999999",
    "0.0000000000000000000000000001",
    "'a'",
    "'2020-01-01'",
    "''",
    "@2020",
    "@2020-02-30",
    "@2020-01-01T10:00:00Z",
    "@T10:00",
    "4 'mg'",
    "3 days",
    "1 'a'",
    "true",
    "false",
    "where(",
    "select(",
    "exists(",
    "all(",
    "repeat(",
    "aggregate(",
    "iif(",
    "first()",
    "last()",
    "tail()",
    "skip(",
    "take(",
    "count()",
    "distinct()",
    "empty()",
    "not()",
    "children()",
    "descendants()",
    "resolve()",
    "ofType(",
    "toString()",
    "toInteger()",
    "toDecimal()",
    "toDate()",
    "toDateTime()",
    "toQuantity(",
    "substring(",
    "indexOf(",
    "matches(",
    "replaceMatches(",
    "replace(",
    "length()",
    "upper()",
    "split(",
    "join(",
    "combine(",
    "union(",
    "intersect(",
    "exclude(",
    "subsetOf(",
    "round(",
    "sqrt()",
    "ln()",
    "power(",
    "log(",
    "lowBoundary(",
    "highBoundary(",
    "precision()",
    "sort(",
    "type()",
    "encode(",
    "decode(",
    "trace(",
    "today()",
    "now()",
    "single()",
    "hasValue()",
    "as(",
    "'[a-z]+'",
    "'(.*'",
    "'$1'",
    "'%'",
    "'10*999'",
    "'mg/dL'",
];

#[test]
fn random_expressions_never_panic() {
    let patient = json!({
        "resourceType": "Patient", "id": "p", "active": true, "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "u", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                 {"use": "usual", "given": ["Jim"]}],
        "telecom": [{"system": "phone", "value": "555"}],
        "contained": [{"resourceType": "Organization", "id": "o", "name": "Acme"}],
        "managingOrganization": {"reference": "#o"}
    });
    let ctx = Context::new(&patient).with_variable("x", vec![json!(1), json!({"a": 1})]);
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let iterations: usize = std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let (mut parsed, mut evaluated) = (0usize, 0usize);
    for _ in 0..iterations {
        let len = 1 + (next() % 12) as usize;
        let src: Vec<&str> = (0..len)
            .map(|_| TOKENS[(next() % TOKENS.len() as u64) as usize])
            .collect();
        let src = src.join(if next() % 2 == 0 { " " } else { "" });
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(e) = Expression::parse(&src) {
                let ok = evaluate(&e, &patient, &ctx).is_ok();
                (true, ok)
            } else {
                (false, false)
            }
        }));
        match outcome {
            Ok((p, e)) => {
                parsed += p as usize;
                evaluated += e as usize;
            }
            Err(_) => panic!("panic on expression: {src}"),
        }
    }
    println!(
        "{iterations} random expressions: {parsed} parsed, {evaluated} evaluated without error"
    );
    assert!(parsed > iterations / 30);

    // Grammar-shaped expressions reach deeper into the evaluator.
    const ATOMS: &[&str] = &[
        "name",
        "name.given",
        "birthDate",
        "telecom.value",
        "1",
        "2.5",
        "-3",
        "'a'",
        "'1.5'",
        "@2020",
        "@2020-01-31T10:00:00+02:00",
        "@T10:30",
        "4 'mg'",
        "3 days",
        "1 year",
        "true",
        "{}",
        "$this",
        "%resource",
        "%x",
        "contained",
        "extension",
        "active",
        "managingOrganization",
        "0.0000000000000000000000000001",
        "9223372036854775807",
    ];
    const POSTFIX: &[&str] = &[
        ".first()",
        ".count()",
        ".where(true)",
        ".where($this = 'Jim')",
        ".select($this)",
        ".exists()",
        ".toString()",
        ".not()",
        "[0]",
        "[5]",
        ".children()",
        ".descendants()",
        ".ofType(HumanName)",
        ".as(string)",
        ".resolve()",
        ".length()",
        ".substring(1)",
        ".round(1)",
        ".lowBoundary()",
        ".highBoundary(6)",
        ".toQuantity('g')",
        ".union(name)",
        ".combine(1)",
        ".distinct()",
        ".repeat(children())",
        ".aggregate($total + $this, 0)",
        ".sort(-$this)",
        ".iif(true, 1, 2)",
        ".abs()",
        ".power(2)",
        ".sqrt()",
        ".split(',')",
        ".join('-')",
        ".toDateTime()",
        ".type().name",
        ".hasValue()",
        ".extension('u').value",
        ".single()",
        ".tail()",
        ".skip(1)",
        ".take(2)",
        ".exp()",
        ".ln()",
        ".log(10)",
        ".truncate()",
        ".ceiling()",
        ".floor()",
        ".toDecimal()",
        ".toInteger()",
        ".toDate()",
        ".toTime()",
        ".convertsToQuantity()",
        ".matches('J.*')",
        ".replaceMatches('(e)', '$1$1')",
        ".indexOf('e')",
        ".precision()",
        ".isDistinct()",
        ".allTrue()",
        ".subsetOf(name)",
        ".intersect(1 | 2)",
        ".exclude(1)",
        ".upper()",
        ".toChars()",
        ".encode('hex')",
        ".decode('base64')",
        ".escape('html')",
        ".getValue()",
        ".memberOf('x')",
        ".conformsTo('http://hl7.org/fhir/StructureDefinition/Patient')",
        ".trace('t')",
    ];
    const OPS: &[&str] = &[
        " + ",
        " - ",
        " * ",
        " / ",
        " div ",
        " mod ",
        " & ",
        " | ",
        " = ",
        " ~ ",
        " != ",
        " !~ ",
        " < ",
        " >= ",
        " and ",
        " or ",
        " xor ",
        " implies ",
        " in ",
        " contains ",
    ];
    let (mut parsed, mut evaluated) = (0usize, 0usize);
    for _ in 0..iterations {
        let terms = 1 + (next() % 3) as usize;
        let mut src = String::new();
        for t in 0..terms {
            if t > 0 {
                src.push_str(OPS[(next() % OPS.len() as u64) as usize]);
            }
            let paren = next() % 4 == 0;
            if paren {
                src.push('(');
            }
            src.push_str(ATOMS[(next() % ATOMS.len() as u64) as usize]);
            for _ in 0..(next() % 4) {
                src.push_str(POSTFIX[(next() % POSTFIX.len() as u64) as usize]);
            }
            if paren {
                src.push(')');
            }
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match Expression::parse(&src) {
                Ok(e) => (true, evaluate(&e, &patient, &ctx).is_ok()),
                Err(_) => (false, false),
            }
        }));
        match outcome {
            Ok((p, e)) => {
                parsed += p as usize;
                evaluated += e as usize;
            }
            Err(_) => panic!("panic on expression: {src}"),
        }
    }
    println!(
        "{iterations} grammar-shaped expressions: {parsed} parsed, {evaluated} evaluated without error"
    );
    assert!(parsed > iterations * 5 / 6);
}
