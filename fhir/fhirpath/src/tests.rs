//! Evaluator unit tests over small hand-written resources.

use super::*;
use serde_json::json;

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "http://example.org/time", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "name": [
            {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
            {"use": "usual", "given": ["Jim"]}
        ],
        "gender": "male",
        "contained": [{"resourceType": "Organization", "id": "org1", "name": "Acme"}],
        "managingOrganization": {"reference": "#org1"}
    })
}

fn eval_json(src: &str, input: &Value) -> Vec<Value> {
    match eval_to_json_array(src, input) {
        Ok(Value::Array(a)) => a,
        other => panic!("{src}: {other:?}"),
    }
}

#[test]
fn navigation_and_functions() {
    let p = patient();
    assert_eq!(
        eval_json("Patient.name.given", &p),
        vec![json!("Peter"), json!("James"), json!("Jim")]
    );
    assert_eq!(
        eval_json("name.where(use = 'usual').given", &p),
        vec![json!("Jim")]
    );
    assert_eq!(eval_json("name.given.count()", &p), vec![json!(3)]);
    assert_eq!(eval_json("name[1].given", &p), vec![json!("Jim")]);
    assert_eq!(
        eval_json("name.given.first() + ' ' + name.family", &p),
        vec![json!("Peter Chalmers")]
    );
    assert_eq!(eval_json("birthDate < @2000-01-01", &p), vec![json!(true)]);
    assert_eq!(eval_json("birthDate = @1974-12", &p), Vec::<Value>::new());
    assert_eq!(eval_json("Encounter.name", &p), Vec::<Value>::new());
    assert_eq!(
        eval_json("birthDate.extension('http://example.org/time').value", &p),
        vec![json!("1974-12-25T14:35:45-05:00")]
    );
    assert_eq!(
        eval_json("managingOrganization.resolve().name", &p),
        vec![json!("Acme")]
    );
    assert_eq!(
        eval_json(
            "name.given.select($this.length()).aggregate($total + $this, 0)",
            &p
        ),
        vec![json!(13)]
    );
    assert_eq!(eval_json("gender.is(code)", &p), vec![json!(true)]);
    assert_eq!(
        eval_json("name.first().is(HumanName)", &p),
        vec![json!(true)]
    );
    assert_eq!(eval_json("active.hasValue()", &p), vec![json!(true)]);
}

#[test]
fn operators_and_logic() {
    let e = json!({});
    assert_eq!(eval_json("1 + 2 * 3", &e), vec![json!(7)]);
    assert_eq!(eval_json("7 div 2", &e), vec![json!(3)]);
    assert_eq!(eval_json("7 mod 2", &e), vec![json!(1)]);
    assert_eq!(eval_json("1 / 0", &e), Vec::<Value>::new());
    assert_eq!(eval_json("{} and false", &e), vec![json!(false)]);
    assert_eq!(eval_json("{} and true", &e), Vec::<Value>::new());
    assert_eq!(eval_json("{} implies true", &e), vec![json!(true)]);
    assert_eq!(eval_json("4.0000 'g' = 4000.0 'mg'", &e), vec![json!(true)]);
    assert_eq!(eval_json("1 year = 1 'a'", &e), Vec::<Value>::new());
    assert_eq!(
        eval_json("@2014-01-31 + 1 month", &e),
        vec![json!("2014-02-28")]
    );
    assert_eq!(eval_json("'abc' ~ 'ABC'", &e), vec![json!(true)]);
    assert_eq!(eval_json("(1 | 2 | 2).count()", &e), vec![json!(2)]);
    assert_eq!(
        eval_json("1.5 'mg'", &e),
        vec![json!({"value": 1.5, "unit": "mg"})]
    );
    assert!(eval_to_json_array("(1 | 2).single()", &e).is_err());
    assert!(eval_to_json_array("1 < 'a'", &e).is_err());
}

#[test]
fn parse_errors_are_reported() {
    let e = Expression::parse("name.foo(").unwrap_err();
    assert!(e.is_parse_error());
    let e = Expression::parse("name.nosuchfunction()").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Semantic);
    let e = Expression::parse("name.where()").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Semantic);
}

#[test]
fn bundle_resolve_and_variables() {
    let bundle = json!({"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "a", "gender": "female"}},
        {"fullUrl": "http://x/fhir/Observation/o", "resource": {"resourceType": "Observation", "id": "o",
            "subject": {"reference": "urn:uuid:1"}, "valueQuantity": {"value": 5.0, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}}
    ]});
    let obs = &bundle["entry"][1]["resource"];
    let expr = Expression::parse("subject.resolve().gender").unwrap();
    let ctx = Context::new(obs).with_root(&bundle);
    let out = evaluate(&expr, obs, &ctx).unwrap();
    assert_eq!(out[0].to_json(), json!("female"));
    let expr = Expression::parse("Observation.value.ofType(Quantity).value > %limit").unwrap();
    let ctx = Context::new(obs).with_variable("limit", vec![json!(4)]);
    let out = evaluate(&expr, obs, &ctx).unwrap();
    assert_eq!(out[0].to_json(), json!(true));
    let q = evaluate_str("Observation.value", obs).unwrap();
    assert_eq!(q[0].type_name(), Some("Quantity"));
    let resolver =
        |r: &str| (r == "Patient/x").then(|| json!({"resourceType": "Patient", "id": "x"}));
    let ctx = Context::new(obs).with_resolver(&resolver);
    let expr = Expression::parse("'Patient/x'.resolve().id").unwrap();
    assert_eq!(evaluate(&expr, obs, &ctx).unwrap()[0].to_json(), json!("x"));
}

#[test]
fn expression_is_send_sync_and_cached() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Expression>();
    let a = compile_cached("name.given").unwrap();
    let b = compile_cached("name.given").unwrap();
    assert!(Arc::ptr_eq(&a.inner, &b.inner));
    assert_eq!(a.source(), "name.given");
}

#[test]
fn deep_but_accepted_expressions_evaluate() {
    let e = json!({"resourceType": "Patient", "name": [{"given": ["a"]}]});
    let union = vec!["name.given"; 250].join(" | ");
    assert_eq!(eval_json(&union, &e), vec![json!("a")]);
    let nested = format!("{}name.given{}", "(".repeat(60), ")".repeat(60));
    assert_eq!(eval_json(&nested, &e), vec![json!("a")]);
    let wheres = format!("name{}", ".where(given.exists())".repeat(200));
    assert_eq!(eval_json(&wheres, &e).len(), 1);
    // Worst case accepted by the parser: 40 nested lambdas around a 120-term arithmetic chain,
    // evaluated on a 2 MiB stack (tokio's default worker stack size).
    let chain = vec!["1"; 120].join(" + ");
    let nested = format!("{}{chain} > 0{}", "select(".repeat(40), ")".repeat(40));
    let src = nested.clone();
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let e = json!({"resourceType": "Patient", "name": [{"given": ["a"]}]});
            eval_to_json_array(&src, &e).map(|v| v.as_array().map(Vec::len))
        })
        .unwrap();
    assert_eq!(handle.join().unwrap().unwrap(), Some(1));
}

#[test]
fn unresolvable_typed_references_resolve_to_stubs() {
    let obs = json!({"resourceType": "Observation", "subject": {"reference": "Patient/123"},
        "performer": [{"reference": "http://other/fhir/Practitioner/9/_history/2"}, {"reference": "urn:uuid:x"}]});
    assert_eq!(
        eval_json("subject.where(resolve() is Patient).reference", &obs),
        vec![json!("Patient/123")]
    );
    assert_eq!(eval_json("performer.resolve().id", &obs), vec![json!("9")]);
    let expr = Expression::parse("subject.resolve()").unwrap();
    let ctx = Context::new(&obs).with_reference_stubs(false);
    assert!(evaluate(&expr, &obs, &ctx).unwrap().is_empty());
}

#[test]
fn more_functions() {
    let e = json!({});
    assert_eq!(
        eval_json("'abc123'.replaceMatches('([a-z]+)([0-9]+)', '$2x$1')", &e),
        vec![json!("123xabc")]
    );
    assert_eq!(
        eval_json("'a,b'.split(',').join('|')", &e),
        vec![json!("a|b")]
    );
    assert_eq!(
        eval_json("(3 | 1 | 2).sort()", &e),
        vec![json!(1), json!(2), json!(3)]
    );
    assert_eq!(eval_json("(1 | 2 | 3).sum()", &e), vec![json!(6)]);
    assert_eq!(eval_json("(1 | 5 | 3).max()", &e), vec![json!(5)]);
    assert_eq!(
        eval_json("@2020-01-01T10:00:00Z.toString()", &e),
        vec![json!("2020-01-01T10:00:00Z")]
    );
    assert_eq!(
        eval_json("'2020-02'.toDate() + 1 month", &e),
        vec![json!("2020-03")]
    );
    assert_eq!(eval_json("@T23:30 + 1 hour", &e), vec![json!("00:30")]);
    assert_eq!(eval_json("1 'kg' > 900 'g'", &e), vec![json!(true)]);
    assert_eq!(eval_json("100 'mg/dL' = 1 'g/L'", &e), vec![json!(true)]);
    assert_eq!(
        eval_json("1 'mL' + 1 'L'", &e),
        vec![json!({"value": 1001, "unit": "mL"})]
    );
    assert_eq!(eval_json("(0.1 + 0.2) = 0.3", &e), vec![json!(true)]);
    assert_eq!(eval_json("1.50.toString()", &e), vec![json!("1.50")]);
    assert_eq!(
        eval_json("%ucum", &e),
        vec![json!("http://unitsofmeasure.org")]
    );
    assert_eq!(
        eval_json("%`vs-administrative-gender`", &e),
        vec![json!("http://hl7.org/fhir/ValueSet/administrative-gender")]
    );
    assert!(eval_to_json_array("%undefined", &e).is_err());
    assert_eq!(
        eval_json("'x'.memberOf('http://hl7.org/fhir/ValueSet/x')", &e),
        Vec::<Value>::new()
    );
}

#[test]
fn strict_mode_and_primitive_extensions() {
    let p = json!({"resourceType": "Patient", "_active": {"extension": [{"url": "u", "valueBoolean": true}]},
        "name": [{"given": ["A", null], "_given": [null, {"extension": [{"url": "v", "valueString": "x"}]}]}]});
    assert_eq!(eval_json("active.hasValue()", &p), vec![json!(false)]);
    assert_eq!(
        eval_json("active.extension('u').value", &p),
        vec![json!(true)]
    );
    assert_eq!(eval_json("name.given.count()", &p), vec![json!(2)]);
    assert_eq!(
        eval_json("name.given.extension('v').value", &p),
        vec![json!("x")]
    );
    let expr = Expression::parse("Patient.nmae").unwrap();
    assert!(evaluate(&expr, &p, &Context::new(&p)).unwrap().is_empty());
    let err = evaluate(&expr, &p, &Context::new(&p).with_strict(true)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Semantic);
    let items = evaluate_str("Patient.name", &p).unwrap();
    assert_eq!(items[0].type_name(), Some("HumanName"));
    assert!(items[0].as_json_node().is_some());
}

#[test]
fn hostile_inputs_error_instead_of_panicking() {
    let e = json!({});
    for src in [
        "@2014-01-01 + 9223372036854775807 years",
        "@2014-01-01 - 9223372036854775807 months",
        "1.0000000000000000000000000001.lowBoundary()",
        "1 '%999999999' = 1 '1'",
        "1 '10*99999' = 1 '1'",
        "9223372036854775807 + 1",
        "(-9223372036854775807 - 1).abs()",
        "1.repeat($this + 1)",
        "'x'.matches('(')",
        "99999999999999999999999999999.0 * 10",
        "@T10:00 + 99999999999999999999 hours",
    ] {
        let _ = eval_to_json_array(src, &e);
    }
}

#[test]
fn member_of_uses_the_terminology_hook() {
    let p = json!({"resourceType": "Patient", "gender": "male",
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}});
    let hook = |v: &Value, vs: &str| -> Option<bool> {
        (vs == "http://hl7.org/fhir/ValueSet/administrative-gender").then(|| v == &json!("male"))
    };
    let ctx = Context::new(&p).with_member_of(&hook);
    let e =
        Expression::parse("gender.memberOf('http://hl7.org/fhir/ValueSet/administrative-gender')")
            .unwrap();
    assert_eq!(evaluate(&e, &p, &ctx).unwrap()[0].to_json(), json!(true));
    let e = Expression::parse("maritalStatus.memberOf('http://x')").unwrap();
    assert!(evaluate(&e, &p, &ctx).unwrap().is_empty());
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    assert_send_sync(&ctx);
}

#[test]
fn system_values_and_boolean_evaluation() {
    let obs = json!({"resourceType": "Observation", "status": "final", "effectiveDateTime": "2020-01-02T03:04:05Z",
        "valueQuantity": {"value": 5.5, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}});
    let eff = evaluate_str("Observation.effective", &obs).unwrap();
    assert!(matches!(eff[0].system_value(), Some(Item::DateTime(_))));
    assert_eq!(eff[0].as_str(), Some("2020-01-02T03:04:05Z"));
    let v = evaluate_str("Observation.value", &obs).unwrap();
    match v[0].system_value() {
        Some(Item::Quantity(q)) => assert_eq!(q.unit, "mg"),
        other => panic!("{other:?}"),
    }
    let ctx = Context::new(&obs);
    let t = Expression::parse("status = 'final'").unwrap();
    assert_eq!(evaluate_boolean(&t, &obs, &ctx).unwrap(), Some(true));
    let e = Expression::parse("issued.exists() and issued > @2000").unwrap();
    assert_eq!(evaluate_boolean(&e, &obs, &ctx).unwrap(), Some(false));
    let m = Expression::parse("(1 | 2)").unwrap();
    assert!(evaluate_boolean(&m, &obs, &ctx).is_err());
}

#[test]
fn lenient_as_function() {
    let p = json!({"resourceType": "Patient", "name": [{"use": "official"}, {"use": "usual"}]});
    let e = Expression::parse("name.as(HumanName).use").unwrap();
    assert!(evaluate(&e, &p, &Context::new(&p)).is_err());
    let out = evaluate(&e, &p, &Context::new(&p).with_lenient_as(true)).unwrap();
    assert_eq!(out.len(), 2);
    let on = evaluate_str("name", &p).unwrap();
    let first_use = Expression::parse("use").unwrap();
    let r = evaluate_on(&first_use, vec![on[1].clone()], &Context::new(&p)).unwrap();
    assert_eq!(r[0].to_json(), json!("usual"));
}
