#!/usr/bin/env python3
"""Vendors the FHIR R4 definitions Kiln needs at run time into fhir/core/definitions/.

Reads the official R4 (4.0.1) definition bundles from ../shared/fhir-r4 (or the directory given
as the first argument) and writes compact, gzipped JSON:

  elements.json.gz            base StructureDefinitions (resources, complex and primitive types)
  valuesets.json.gz           enumerable value sets used by required bindings: url -> [[system, code]]
  search-parameters.json.gz   the SearchParameters in compact form
  compartment-patient.json.gz the Patient CompartmentDefinition: resource type -> [param names]

Python 3 standard library only. Run from anywhere:
    python3 fhir/core/tools/vendor_definitions.py [/work/shared/fhir-r4]
"""

import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "definitions")
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
R4 = "4.0.1"


def load(src, name):
    with open(os.path.join(src, name), encoding="utf-8") as f:
        return json.load(f)


def resources(bundle, rtype):
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == rtype:
            yield res


def write(name, data):
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    path = os.path.join(OUT, name)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(raw)
    print(f"{name}: {len(raw)} bytes raw, {os.path.getsize(path)} gzipped")


def strip_version(url):
    return url.split("|", 1)[0] if url else url


def ext_value(exts, url):
    for e in exts or []:
        if e.get("url") == url:
            for k, v in e.items():
                if k.startswith("value"):
                    return v
    return None


def type_code(t, path, kind, type_name):
    code = t.get("code", "")
    if code.startswith("http://hl7.org/fhirpath/System."):
        fhir_type = ext_value(t.get("extension"), FHIR_TYPE_EXT)
        # Resource.id is declared as System.String/string in R4 but its type is `id`.
        parts = path.split(".")
        if kind == "resource" and len(parts) == 2 and parts[1] == "id":
            return "id"
        if parts[-1] == "value" and len(parts) == 2 and kind == "primitive-type":
            # the primitive's own value: keep the System type (String, Boolean, ...)
            return code
        return fhir_type or code
    return code


def compact_element(el, kind, type_name):
    path = el["path"]
    out = {"p": path, "min": el.get("min", 0), "max": el.get("max", "*")}
    types = []
    for t in el.get("type", []):
        code = type_code(t, path, kind, type_name)
        targets = [u.rsplit("/", 1)[-1] for u in t.get("targetProfile", [])]
        types.append([code, targets])
    if types:
        out["t"] = types
    b = el.get("binding")
    if b and b.get("valueSet"):
        out["b"] = [b.get("strength"), strip_version(b["valueSet"])]
    if el.get("isSummary"):
        out["s"] = 1
    if el.get("isModifier"):
        out["m"] = 1
    if el.get("contentReference"):
        out["cr"] = el["contentReference"].lstrip("#")
    rep = el.get("representation")
    if rep:
        out["r"] = rep[0]
    return out


def structure_definitions(src):
    out = []
    for bundle_name in ("profiles-types.json", "profiles-resources.json"):
        for sd in resources(load(src, bundle_name), "StructureDefinition"):
            if sd.get("version") != R4:
                continue  # e.g. a backported SubscriptionStatus (4.3.0) is not part of R4
            kind = sd.get("kind")
            if kind not in ("resource", "complex-type", "primitive-type"):
                continue
            if sd.get("derivation", "specialization") != "specialization":
                continue  # constraints (SimpleQuantity, MoneyQuantity, profiles)
            name = sd["id"]
            base = sd.get("baseDefinition")
            t = {
                "name": name,
                "kind": kind,
                "abstract": bool(sd.get("abstract")),
            }
            if base:
                t["base"] = base.rsplit("/", 1)[-1]
            elements = sd["snapshot"]["element"]
            t["elements"] = [compact_element(e, kind, name) for e in elements[1:]]
            # Invariants defined by this type (inherited copies, whose `source` is another
            # StructureDefinition, are left out): [path, key, severity, human, expression].
            constraints = []
            for e in elements:
                for c in e.get("constraint", []):
                    source = c.get("source")
                    if source and source != sd["url"]:
                        continue
                    if not c.get("expression"):
                        continue
                    constraints.append(
                        [e["path"], c["key"], c.get("severity", "error"), c.get("human", ""),
                         c["expression"]]
                    )
            if constraints:
                t["c"] = constraints
            if kind == "primitive-type":
                for e in elements:
                    if e["path"] == name + ".value":
                        for ty in e.get("type", []):
                            rx = ext_value(ty.get("extension"), REGEX_EXT)
                            if rx:
                                t["regex"] = rx
            out.append(t)
    return out


def code_systems(src):
    systems = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for cs in resources(load(src, name), "CodeSystem"):
            systems[cs["url"]] = cs
    return systems


def value_sets(src):
    vss = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for vs in resources(load(src, name), "ValueSet"):
            vss[strip_version(vs["url"])] = vs
    return vss


def all_codes(concepts):
    for c in concepts or []:
        yield c["code"]
        yield from all_codes(c.get("concept"))


def expand(url, vss, systems, stack=()):
    """The (system, code) list of a value set, or None if not enumerable from the spec."""
    vs = vss.get(url)
    if vs is None or url in stack:
        return None
    compose = vs.get("compose")
    if not compose:
        return None
    result = []

    def include_codes(inc):
        if inc.get("filter"):
            return None
        codes = []
        system = inc.get("system")
        if system:
            if inc.get("concept"):
                codes = [(system, c["code"]) for c in inc["concept"]]
            else:
                cs = systems.get(system)
                if cs is None or cs.get("content", "complete") != "complete":
                    return None
                codes = [(system, c) for c in all_codes(cs.get("concept"))]
        sets = [strip_version(v) for v in inc.get("valueSet", [])]
        for sub in sets:
            sub_codes = expand(sub, vss, systems, stack + (url,))
            if sub_codes is None:
                return None
            if system:
                sub_set = set(map(tuple, sub_codes))
                codes = [c for c in codes if c in sub_set]
            else:
                codes = codes + [tuple(c) for c in sub_codes] if not codes else codes
        return codes

    for inc in compose.get("include", []):
        codes = include_codes(inc)
        if codes is None:
            return None
        result.extend(codes)
    excluded = set()
    for exc in compose.get("exclude", []):
        codes = include_codes(exc)
        if codes is None:
            return None
        excluded.update(codes)
    seen = set()
    out = []
    for c in result:
        c = tuple(c)
        if c not in excluded and c not in seen:
            seen.add(c)
            out.append(list(c))
    return out


def required_value_sets(src, types):
    urls = set()
    for t in types:
        for e in t["elements"]:
            b = e.get("b")
            if b and b[0] == "required":
                urls.add(b[1])
    vss = value_sets(src)
    systems = code_systems(src)
    out = {}
    skipped = []
    for url in sorted(urls):
        codes = expand(url, vss, systems)
        if codes is None:
            skipped.append(url)
        else:
            out[url] = codes
    print(f"required value sets: {len(out)} enumerated, {len(skipped)} not enumerable")
    return out


def search_parameters(src):
    out = []
    for sp in resources(load(src, "search-parameters.json"), "SearchParameter"):
        p = {"url": sp["url"], "code": sp["code"], "base": sp.get("base", []), "type": sp["type"]}
        for key in ("expression", "xpathUsage"):
            if key in sp:
                p[key] = sp[key]
        for key in ("target", "modifier", "comparator", "chain"):
            if sp.get(key):
                p[key] = sp[key]
        for key in ("multipleOr", "multipleAnd"):
            if key in sp:
                p[key] = sp[key]
        if sp.get("component"):
            p["component"] = [
                {"definition": c.get("definition"), "expression": c.get("expression")}
                for c in sp["component"]
            ]
        out.append(p)
    return out


def compartment(src):
    cd = load(src, "compartmentdefinition-patient.json")
    return {r["code"]: r.get("param", []) for r in cd.get("resource", [])}


def main():
    default = os.path.join(HERE, "..", "..", "..", "..", "shared", "fhir-r4")
    src = sys.argv[1] if len(sys.argv) > 1 else default
    os.makedirs(OUT, exist_ok=True)
    types = structure_definitions(src)
    print(f"types: {len(types)}")
    write("elements.json.gz", types)
    write("valuesets.json.gz", required_value_sets(src, types))
    sps = search_parameters(src)
    print(f"search parameters: {len(sps)}")
    write("search-parameters.json.gz", sps)
    write("compartment-patient.json.gz", compartment(src))


if __name__ == "__main__":
    main()
