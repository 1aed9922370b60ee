//! Result parameters (`_sort`, `_count` and paging, `_summary`, `_elements`, `_total`),
//! `POST _search`, and error handling, against the fixture.

use kiln_conformance_tests::{backend_tests, entries, link, send, Method, TestServer};
use serde_json::{json, Value};

use super::fixture::{load, match_ids, url_of, Checker};

backend_tests!(
    sort_parameter,
    keyset_paging,
    summary_elements_total,
    post_search,
    errors_and_handling,
);

async fn sort_parameter(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "_sort");
    c.ordered("Patient?_sort=birthdate", &["p1", "p2", "p5", "p3", "p4"])
        .await;
    c.ordered("Patient?_sort=-birthdate", &["p4", "p3", "p5", "p2", "p1"])
        .await;
    c.ordered("Patient?_sort=family", &["p3", "p4", "p1", "p2", "p5"])
        .await;
    c.ordered("Patient?_sort=-family", &["p5", "p2", "p1", "p4", "p3"])
        .await;
    c.ordered(
        "Patient?_sort=gender,-birthdate",
        &["p3", "p1", "p2", "p4", "p5"],
    )
    .await;
    c.ordered("Patient?_sort=_id", &["p1", "p2", "p3", "p4", "p5"])
        .await;
    c.ordered("Patient?_sort=-_id", &["p5", "p4", "p3", "p2", "p1"])
        .await;
    c.ordered(
        "Patient?_sort=organization,family",
        &["p1", "p2", "p3", "p4", "p5"],
    )
    .await;
    c.ordered(
        "Observation?code=2339-0&_sort=value-quantity",
        &["o6", "o3", "o4", "o5"],
    )
    .await;
    c.ordered(
        "Observation?code=2339-0&_sort=-value-quantity",
        &["o5", "o4", "o3", "o6"],
    )
    .await;
    c.ordered(
        "Observation?category=vital-signs&_sort=-date",
        &["o8", "o7", "o1", "o2"],
    )
    .await;
    c.ordered(
        "Observation?code=2339-0&_sort=date",
        &["o4", "o6", "o3", "o5"],
    )
    .await;
    c.ordered(
        "Observation?category=vital-signs&_sort=status,-date",
        &["o8", "o1", "o2", "o7"],
    )
    .await;
    c.ordered("RiskAssessment?_sort=probability", &["ra2", "ra3", "ra1"])
        .await;
    c.ordered("RiskAssessment?_sort=-probability", &["ra1", "ra3", "ra2"])
        .await;
    c.ordered("Encounter?_sort=date", &["e3", "e1", "e2"]).await;
    c.ordered("Condition?_sort=-onset-date", &["c2", "c1", "c3"])
        .await;
    c.ordered("Organization?_sort=-name", &["org2", "org1"])
        .await;
    c.ordered("ValueSet?_sort=url", &["vs3", "vs1", "vs2"])
        .await;
    // sorted results page in the same order
    let first = c.search("Patient?_sort=family&_count=2").await;
    if let Some(first) = first {
        let pages = srv.all_pages(&first, 5).await;
        let got: Vec<String> = pages.iter().flat_map(match_ids).collect();
        c.check(got == ["p3", "p4", "p1", "p2", "p5"], || {
            format!("Patient?_sort=family&_count=2 pages: {got:?}")
        });
        c.check(pages.len() == 3, || format!("3 pages, got {}", pages.len()));
    }
    // previous links walk the same pages backwards, also across missing sort values
    for (q, n_pages) in [
        ("Patient?_sort=gender,-birthdate&_count=2", 3),
        ("Observation?_sort=-date&_count=3", 4),
        ("Observation?_sort=status,value-quantity&_count=4", 3),
    ] {
        let Some(first) = c.search(q).await else {
            continue;
        };
        let pages = srv.all_pages(&first, 10).await;
        c.check(pages.len() == n_pages, || {
            format!("{q}: {} pages", pages.len())
        });
        let mut back = vec![pages.last().cloned().unwrap_or(Value::Null)];
        while let Some(prev) = link(back.last().unwrap_or(&Value::Null), "previous") {
            if back.len() > 10 {
                break;
            }
            back.push(get_link(srv, &prev).await);
        }
        back.reverse();
        let fwd: Vec<Vec<String>> = pages.iter().map(match_ids).collect();
        let bwd: Vec<Vec<String>> = back.iter().map(match_ids).collect();
        c.check(fwd == bwd, || {
            format!("{q}: forward {fwd:?}, backward {bwd:?}")
        });
    }
    c.finish();
}

fn ids_on(page: &Value) -> Vec<String> {
    match_ids(page)
}

async fn get_link(srv: &TestServer, url: &str) -> Value {
    let r = send(srv.client.get(url)).await;
    r.assert_status(200);
    r.json()
}

async fn keyset_paging(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "paging");
    // plain paging over all 10 observations
    let first = c
        .search("Observation?_count=4&_total=accurate")
        .await
        .expect("first page");
    c.check(first["total"] == 10, || {
        format!("total 10: {}", first["total"])
    });
    let pages = srv.all_pages(&first, 10).await;
    let sizes: Vec<usize> = pages.iter().map(|p| ids_on(p).len()).collect();
    c.check(sizes == [4, 4, 2], || format!("page sizes {sizes:?}"));
    let mut all: Vec<String> = pages.iter().flat_map(ids_on).collect();
    all.sort();
    let mut want: Vec<String> = (1..=10).map(|i| format!("o{i}")).collect();
    want.sort();
    c.check(all == want, || format!("all pages: {all:?}"));
    for p in &pages {
        c.check(p["total"] == 10, || {
            format!("every page has total 10: {}", p["total"])
        });
        c.check(link(p, "first").is_some(), || {
            "first link on every page".into()
        });
    }
    // next/previous links walk back and forth
    let p2 = &pages[1];
    match link(p2, "previous") {
        Some(prev) => {
            let back = get_link(srv, &prev).await;
            c.check(ids_on(&back) == ids_on(&pages[0]), || {
                format!(
                    "previous of page 2 is page 1: {:?} vs {:?}",
                    ids_on(&back),
                    ids_on(&pages[0])
                )
            });
            c.check(link(&back, "previous").is_none(), || {
                "page 1 reached through previous has no previous link".into()
            });
        }
        None => c.check(false, || format!("page 2 has a previous link: {p2}")),
    }
    c.check(link(&pages[0], "previous").is_none(), || {
        "first page has no previous link".into()
    });
    if let Some(prev) = link(&pages[2], "previous") {
        let back = get_link(srv, &prev).await;
        c.check(ids_on(&back) == ids_on(&pages[1]), || {
            format!("previous of page 3 is page 2: {:?}", ids_on(&back))
        });
        if let Some(next) = link(&back, "next") {
            let fwd = get_link(srv, &next).await;
            c.check(ids_on(&fwd) == ids_on(&pages[2]), || {
                format!("next of (previous of page 3) is page 3: {:?}", ids_on(&fwd))
            });
        } else {
            c.check(false, || {
                "a page reached through previous has a next link".into()
            });
        }
    } else {
        c.check(false, || "page 3 has a previous link".into());
    }

    // keyset: resources created between page fetches neither duplicate nor skip entries
    let page1 = c
        .search("Patient?_sort=birthdate&_count=2")
        .await
        .expect("page 1");
    c.check(ids_on(&page1) == ["p1", "p2"], || {
        format!("page 1: {:?}", ids_on(&page1))
    });
    for (id, born) in [("p6", "1960-05-05"), ("p7", "1995-07-07")] {
        srv.put_json(
            &format!("Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id, "name": [{"family": "Late"}], "birthDate": born}),
        )
        .await
        .assert_status(201);
    }
    let next = link(&page1, "next").expect("next link");
    let page2 = get_link(srv, &next).await;
    c.check(ids_on(&page2) == ["p5", "p3"], || {
        format!("page 2 after concurrent creates: {:?}", ids_on(&page2))
    });
    // a write to an already-seen resource does not move it into a later page
    srv.put_json(
        "Patient/p1",
        &json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Smith"}], "birthDate": "1970-01-01", "gender": "female"}),
    )
    .await
    .assert_status(200);
    let next = link(&page2, "next").expect("next link on page 2");
    let page3 = get_link(srv, &next).await;
    c.check(ids_on(&page3) == ["p7", "p4"], || {
        format!("page 3: {:?}", ids_on(&page3))
    });
    c.check(link(&page3, "next").is_none(), || {
        "page 3 is the last".into()
    });
    // the same next link gives the same page again (stable cursors)
    let again = get_link(srv, &next).await;
    c.check(ids_on(&again) == ids_on(&page3), || {
        "cursor is repeatable".into()
    });
    // _count=0: no entries, only the total
    let b = c
        .search("Patient?_count=0&_total=accurate")
        .await
        .expect("count 0");
    c.check(entries(&b).is_empty() && b["total"] == 7, || {
        format!("_count=0: {b}")
    });
    // a garbled cursor is a 400
    let r = srv
        .get("Patient?_sort=birthdate&_count=2&_cursor=garbage")
        .await;
    c.check(r.status == 400, || {
        format!("garbled cursor: HTTP {}", r.status)
    });
    c.finish();
}

async fn summary_elements_total(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "_summary/_elements/_total");
    let read = srv.get("Patient/p1").await.json();
    let one = |b: &Value| -> Value {
        entries(b)
            .first()
            .map(|e| e["resource"].clone())
            .unwrap_or(Value::Null)
    };
    let subsetted = |r: &Value| {
        r["meta"]["tag"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["code"] == "SUBSETTED"))
    };
    if let Some(b) = c.search("Patient?_id=p1&_summary=true").await {
        let r = one(&b);
        c.check(
            r["name"].is_array()
                && r["gender"] == "female"
                && r["birthDate"] == "1970-01-01"
                && r["managingOrganization"].is_object()
                && r.get("text").is_none()
                && r.get("generalPractitioner").is_none()
                && subsetted(&r),
            || format!("_summary=true: {r}"),
        );
    }
    if let Some(b) = c.search("Patient?_id=p1&_summary=text").await {
        let r = one(&b);
        c.check(
            r["text"].is_object()
                && r["id"] == "p1"
                && r.get("name").is_none()
                && r.get("gender").is_none()
                && subsetted(&r),
            || format!("_summary=text: {r}"),
        );
    }
    if let Some(b) = c.search("Patient?_id=p1&_summary=data").await {
        let r = one(&b);
        c.check(
            r.get("text").is_none()
                && r["name"].is_array()
                && r["generalPractitioner"].is_array()
                && subsetted(&r),
            || format!("_summary=data: {r}"),
        );
    }
    if let Some(b) = c.search("Patient?_id=p1&_summary=false").await {
        let r = one(&b);
        c.check(r == read, || {
            format!("_summary=false is the full resource: {r}")
        });
    }
    if let Some(b) = c.search("Patient?_summary=count").await {
        c.check(b["total"] == 5 && entries(&b).is_empty(), || {
            format!("_summary=count: {b}")
        });
    }
    if let Some(b) = c.search("Observation?code=2339-0&_summary=count").await {
        c.check(b["total"] == 4 && entries(&b).is_empty(), || {
            format!("_summary=count by code: {b}")
        });
    }
    if let Some(b) = c.search("Patient?_id=p1&_elements=gender,birthDate").await {
        let r = one(&b);
        c.check(
            r["gender"] == "female"
                && r["birthDate"] == "1970-01-01"
                && r["id"] == "p1"
                && r.get("name").is_none()
                && r.get("identifier").is_none()
                && subsetted(&r),
            || format!("_elements=gender,birthDate: {r}"),
        );
    }
    // _elements applies to matches, not to included resources
    if let Some(b) = c
        .search("Observation?_id=o1&_elements=status&_include=Observation:patient")
        .await
    {
        let es = entries(&b);
        let obs = es
            .iter()
            .find(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"].clone())
            .unwrap_or(Value::Null);
        let pat = es
            .iter()
            .find(|e| e["search"]["mode"] == "include")
            .map(|e| e["resource"].clone())
            .unwrap_or(Value::Null);
        // mandatory elements (code) may come along; optional ones not asked for do not
        c.check(
            obs["status"] == "final"
                && obs.get("subject").is_none()
                && obs.get("valueQuantity").is_none(),
            || format!("_elements on the match: {obs}"),
        );
        c.check(pat["name"].is_array(), || {
            format!("include is complete: {pat}")
        });
    }
    if let Some(b) = c.search("Patient?_total=none").await {
        c.check(b.get("total").is_none() && entries(&b).len() == 5, || {
            format!("_total=none: {b}")
        });
    }
    if let Some(b) = c.search("Patient?_total=accurate&_count=2").await {
        c.check(b["total"] == 5 && entries(&b).len() == 2, || {
            format!("_total=accurate: {b}")
        });
    }
    if let Some(b) = c.search("Patient?_total=estimate&_count=2").await {
        c.check(b.get("total").is_none() || b["total"] == 5, || {
            format!("_total=estimate: {}", b["total"])
        });
    }
    if let Some(b) = c.search("Patient?gender=female").await {
        c.check(b["total"] == 2, || format!("default total: {}", b["total"]));
    }
    c.finish();
}

async fn post_form(srv: &TestServer, path: &str, body: &str) -> Value {
    let r = send(
        srv.request(Method::POST, path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string()),
    )
    .await;
    r.assert_status(200);
    r.json()
}

async fn post_search(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "POST _search");
    for q in [
        "family=smith&_sort=birthdate",
        "birthdate=lt1985-06-01&_sort=-birthdate",
        "identifier=http://example.org/mrn|a\\,b\\|c\\$d",
        "_has:Observation:patient:code=2339-0&_sort=family",
        "_filter=gender eq male or family eq Jones&_sort=_id",
    ] {
        let get = c
            .search(&format!("Patient?{q}"))
            .await
            .unwrap_or(Value::Null);
        let body = super::fixture::encode_query(q);
        let post = post_form(srv, "Patient/_search", &body).await;
        c.check(
            post["type"] == "searchset"
                && match_ids(&post) == match_ids(&get)
                && !match_ids(&get).is_empty(),
            || {
                format!(
                    "POST {q}: {:?} vs GET {:?}",
                    match_ids(&post),
                    match_ids(&get)
                )
            },
        );
    }
    // URL and body parameters combine
    let b = post_form(srv, &url_of("Patient/_search?gender=male"), "family=smith").await;
    c.check(match_ids(&b) == ["p2"], || {
        format!("URL + body: {:?}", match_ids(&b))
    });
    // system level and compartment level
    let b = post_form(srv, "_search", "_type=Patient&family=jones").await;
    c.check(match_ids(&b) == ["p3"], || {
        format!("POST _search: {:?}", match_ids(&b))
    });
    let b = post_form(srv, "Patient/p1/Observation/_search", "code=8302-2").await;
    c.check(match_ids(&b) == ["o2"], || {
        format!("POST compartment _search: {:?}", match_ids(&b))
    });
    c.finish();
}

async fn errors_and_handling(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "errors");
    let strict = [("prefer", "handling=strict")];
    c.error("Patient?nonsense=1", &strict, 400, &["nonsense"])
        .await;
    c.error(
        "Patient?family=smith&nonsense=1",
        &strict,
        400,
        &["nonsense"],
    )
    .await;
    c.error(
        "Observation?subject.nonsense=x",
        &strict,
        400,
        &["nonsense"],
    )
    .await;
    c.error(
        "Patient?_has:Observation:nonsense:code=x",
        &strict,
        400,
        &["nonsense"],
    )
    .await;
    // strict with only known parameters is fine
    let r = srv
        .get_with(&url_of("Patient?family=smith&_sort=birthdate"), &strict)
        .await;
    c.check(
        r.status == 200 && match_ids(&r.json()) == ["p1", "p2"],
        || format!("strict, all known: {}", r.text()),
    );
    // lenient (the default): ignored, and absent from self
    for h in [&[][..], &[("prefer", "handling=lenient")][..]] {
        let r = srv
            .get_with(&url_of("Patient?nonsense=1&family=jones"), h)
            .await;
        let b = r.json();
        let own = link(&b, "self").unwrap_or_default();
        c.check(r.status == 200 && match_ids(&b) == ["p3"], || {
            format!("lenient: {}", r.text())
        });
        c.check(
            !own.contains("nonsense") && own.contains("family=jones"),
            || format!("self link: {own}"),
        );
    }
    // malformed values of known parameters: always 400, naming parameter and value
    for h in [&[][..], &strict[..]] {
        c.error("Patient?birthdate=ge19x0", h, 400, &["birthdate", "ge19x0"])
            .await;
    }
    c.error(
        "Patient?birthdate=xx2000",
        &[],
        400,
        &["birthdate", "xx2000"],
    )
    .await;
    c.error(
        "Patient?birthdate=2000-13-01",
        &[],
        400,
        &["birthdate", "2000-13-01"],
    )
    .await;
    c.error("Patient?family:foo=Smith", &[], 400, &["family", "foo"])
        .await;
    c.error("Patient?gender:exact=male", &[], 400, &["gender", "exact"])
        .await;
    c.error(
        "Observation?value-quantity=abc",
        &[],
        400,
        &["value-quantity", "abc"],
    )
    .await;
    c.error(
        "Observation?value-quantity=5|a|b|c",
        &[],
        400,
        &["value-quantity"],
    )
    .await;
    c.error(
        "RiskAssessment?probability=zero",
        &[],
        400,
        &["probability", "zero"],
    )
    .await;
    c.error("Observation?code=a|b|c", &[], 400, &["code", "a|b|c"])
        .await;
    c.error(
        "Patient?gender:missing=maybe",
        &[],
        400,
        &["gender", "maybe"],
    )
    .await;
    c.error("Observation?subject:Foo=1", &[], 400, &["subject"])
        .await;
    c.error(
        "Observation?code-value-quantity=2339-0",
        &[],
        400,
        &["code-value-quantity"],
    )
    .await;
    c.error(
        "Patient?_sort=nonexistent",
        &[],
        400,
        &["_sort", "nonexistent"],
    )
    .await;
    c.error("Patient?_count=abc", &[], 400, &["_count", "abc"])
        .await;
    c.error("Patient?_summary=bogus", &[], 400, &["_summary", "bogus"])
        .await;
    c.error("Patient?_total=maybe", &[], 400, &["_total", "maybe"])
        .await;
    c.error(
        "Patient?_include=Patient:name",
        &[],
        400,
        &["_include", "Patient:name"],
    )
    .await;
    c.error("Patient?_filter=family xx smith", &[], 400, &["_filter"])
        .await;
    c.error("Patient?_filter=(family eq smith", &[], 400, &["_filter"])
        .await;
    c.error(
        "Patient?_contained=maybe",
        &[],
        400,
        &["_contained", "maybe"],
    )
    .await;
    c.error(
        "Patient?_contained=true&_containedType=both",
        &[],
        400,
        &["_containedType", "both"],
    )
    .await;
    // the fixture contains nothing: `_contained=true` finds nothing, `both` what `false` finds
    // (contained resources are covered by search_features.rs)
    let r = srv
        .get_with(
            &url_of("Patient?_contained=true&family=jones"),
            &[("prefer", "handling=strict")],
        )
        .await;
    let b = r.json();
    let own = link(&b, "self").unwrap_or_default();
    c.check(
        r.status == 200 && match_ids(&b).is_empty() && own.contains("_contained=true"),
        || format!("_contained=true over a fixture without contained resources: {own}"),
    );
    let r = srv
        .get(&url_of("Patient?_contained=both&family=jones"))
        .await;
    let b = r.json();
    c.check(r.status == 200 && match_ids(&b) == ["p3"], || {
        format!("_contained=both finds the resources that are not contained: {b}")
    });
    c.error("NotAType?x=1", &[], 404, &[]).await;
    c.finish();
}
