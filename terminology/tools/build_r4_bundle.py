#!/usr/bin/env python3
"""Builds terminology/data/r4-terminology.json.gz: a compact, gzip'd collection Bundle of the
R4 CodeSystems, ValueSets and ConceptMaps Kiln needs at run time.

Sources (all CC0, marked `vendor: yes` in ../shared/README.md):
  ../shared/fhir-r4/{valuesets.json, v3-codesystems.json, v2-tables.json, conceptmaps.json}
  ../shared/fhir-r4/hl7.terminology.r4-7.0.1.tgz  (THO; wins over the 4.0.1 copies of the same url)
Compaction: narrative (`text`), `meta`, and resource-level extensions other than a few
terminology-relevant ones are dropped; JSON is written without whitespace.

Usage: python3 terminology/tools/build_r4_bundle.py [path/to/shared]
"""
import gzip, io, json, os, sys, tarfile

shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../../shared")
fhir = os.path.join(shared, "fhir-r4")
out = os.path.join(os.path.dirname(__file__), "../data/r4-terminology.json.gz")

KEEP_TYPES = {"CodeSystem", "ValueSet", "ConceptMap"}
DROP = {"text", "meta", "contact", "description", "purpose", "copyright", "jurisdiction",
        "useContext", "identifier", "publisher", "date"}

def compact(r):
    r = {k: v for k, v in r.items() if k not in DROP}
    if "extension" in r:
        del r["extension"]
    return r

resources = {}  # (type, url, version) -> resource

def add(r, prefer):
    if r.get("resourceType") not in KEEP_TYPES or "url" not in r:
        return
    key = (r["resourceType"], r["url"])
    if key in resources and not prefer:
        return
    resources[key] = compact(r)

for name in ["valuesets.json", "v3-codesystems.json", "v2-tables.json", "conceptmaps.json"]:
    b = json.load(open(os.path.join(fhir, name), encoding="utf-8"))
    for e in b.get("entry", []):
        add(e.get("resource", {}), prefer=False)

with tarfile.open(os.path.join(fhir, "hl7.terminology.r4-7.0.1.tgz")) as t:
    for m in t.getmembers():
        n = os.path.basename(m.name)
        if not m.isfile() or not n.endswith(".json") or n.split("-")[0] not in KEEP_TYPES:
            continue
        r = json.load(t.extractfile(m))
        add(r, prefer=True)

bundle = {"resourceType": "Bundle", "type": "collection",
          "entry": [{"resource": r} for _, r in sorted(resources.items())]}
data = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
    f.write(data)
counts = {}
for (t, _) in resources:
    counts[t] = counts.get(t, 0) + 1
print(f"{out}: {len(resources)} resources {counts}, {len(data)/1e6:.1f} MB raw, "
      f"{os.path.getsize(out)/1e6:.1f} MB gzip")
