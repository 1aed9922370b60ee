#!/usr/bin/env python3
"""Generates synthetic LOINC and SNOMED CT releases in the official file layouts, for load and
search benchmarks (the real content is licensed and not available here). Content is random but
shaped like the real thing: LOINC 6-axis names + multiaxial hierarchy; SNOMED concepts with an
FSN, synonyms, a US-English language refset and an inferred IS-A DAG (several parents).

Usage: python3 terminology/tools/gen_synthetic.py OUT_DIR [--loinc 100000] [--snomed 350000]
       (defaults give ~100k LOINC terms, 350k SNOMED concepts, ~1.5M descriptions, ~1M IS-A)
Then:  cargo run -p kiln-terminology --release --bin kiln-tx-bench -- OUT_DIR
"""
import argparse, csv, os, random

WORDS = ("glucose sodium potassium chloride calcium hemoglobin platelet leukocyte albumin "
         "bilirubin creatinine urea cholesterol triglyceride ferritin troponin lactate insulin "
         "cortisol thyroxine antibody antigen virus bacteria fungus culture panel ratio index "
         "fracture diabetes asthma pneumonia hypertension infection neoplasm injury syndrome "
         "disorder chronic acute left right upper lower bilateral congenital primary secondary "
         "renal hepatic cardiac pulmonary cerebral retinal arterial venous muscular skeletal").split()
PROPS = ["MCnc", "SCnc", "NCnc", "ACnc", "Prid", "Find", "Titr", "PrThr"]
SYSTEMS = ["Ser/Plas", "Bld", "Urine", "CSF", "Ser", "Plas", "Stool", "XXX"]
SCALES = ["Qn", "Ord", "Nom", "Nar"]
METHODS = ["", "", "Automated count", "Manual count", "Test strip", "IA", "LC/MS/MS"]
CLASSES = ["CHEM", "HEM/BC", "MICRO", "SERO", "DRUG/TOX", "UA", "COAG"]

LOINC_COLS = ("LOINC_NUM,COMPONENT,PROPERTY,TIME_ASPCT,SYSTEM,SCALE_TYP,METHOD_TYP,CLASS,"
              "VersionLastChanged,CHNG_TYPE,DefinitionDescription,STATUS,CONSUMER_NAME,CLASSTYPE,"
              "FORMULA,EXMPL_ANSWERS,SURVEY_QUEST_TEXT,SURVEY_QUEST_SRC,UNITSREQUIRED,RELATEDNAMES2,"
              "SHORTNAME,ORDER_OBS,HL7_FIELD_SUBFIELD_ID,EXTERNAL_COPYRIGHT_NOTICE,EXAMPLE_UNITS,"
              "LONG_COMMON_NAME,EXAMPLE_UCUM_UNITS,STATUS_REASON,STATUS_TEXT,CHANGE_REASON_PUBLIC,"
              "COMMON_TEST_RANK,COMMON_ORDER_RANK,HL7_ATTACHMENT_STRUCTURE,EXTERNAL_COPYRIGHT_LINK,"
              "PanelType,AskAtOrderEntry,AssociatedObservations,VersionFirstReleased,"
              "ValidHL7AttachmentRequest,DisplayName").split(",")


def phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def loinc(out, n, rng):
    base = os.path.join(out, "loinc")
    os.makedirs(os.path.join(base, "LoincTable"), exist_ok=True)
    hdir = os.path.join(base, "AccessoryFiles", "ComponentHierarchyBySystem")
    os.makedirs(hdir, exist_ok=True)
    parts = [f"LP{100000 + i}-{i % 10}" for i in range(max(10, n // 100))]
    with open(os.path.join(base, "LoincTable", "Loinc.csv"), "w", newline="", encoding="utf-8") as f, \
         open(os.path.join(hdir, "ComponentHierarchyBySystem.csv"), "w", newline="", encoding="utf-8") as h:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        hw = csv.writer(h, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        w.writerow(LOINC_COLS)
        hw.writerow(["PATH_TO_ROOT", "SEQUENCE", "IMMEDIATE_PARENT", "CODE", "CODE_TEXT"])
        hw.writerow(["", "1", "", parts[0], "{component}"])
        for i, p in enumerate(parts[1:], 1):
            parent = parts[rng.randrange(0, i)] if i > 1 else parts[0]
            hw.writerow([parent, "1", parent, p, phrase(rng, 2)])
        for i in range(n):
            code = f"{10000 + i}-{(i * 7) % 10}"
            comp = phrase(rng, rng.randint(1, 3)).capitalize()
            prop, sysm, scale, meth = rng.choice(PROPS), rng.choice(SYSTEMS), rng.choice(SCALES), rng.choice(METHODS)
            long = f"{comp} [{prop}] in {sysm}" + (f" by {meth}" if meth else "")
            row = {c: "" for c in LOINC_COLS}
            row.update(LOINC_NUM=code, COMPONENT=comp, PROPERTY=prop, TIME_ASPCT="Pt", SYSTEM=sysm,
                       SCALE_TYP=scale, METHOD_TYP=meth, CLASS=rng.choice(CLASSES), CLASSTYPE="1",
                       STATUS="DEPRECATED" if rng.random() < 0.05 else "ACTIVE",
                       SHORTNAME=comp[:20], LONG_COMMON_NAME=long, DisplayName=long,
                       VersionFirstReleased="2.0", VersionLastChanged="2.80", ORDER_OBS="Both")
            w.writerow([row[c] for c in LOINC_COLS])
            hw.writerow([parts[0], "1", rng.choice(parts), code, long])
    print(f"LOINC: {n} terms, {len(parts)} parts -> {base}")


def snomed(out, n, rng):
    base = os.path.join(out, "snomed", "Snapshot")
    term = os.path.join(base, "Terminology")
    lang = os.path.join(base, "Refset", "Language")
    os.makedirs(term, exist_ok=True)
    os.makedirs(lang, exist_ok=True)
    M = "900000000000207008"
    ids = [str(138875005)] + [str(100000000 + i * 10) for i in range(1, n)]
    nd = nr = 0
    with open(os.path.join(term, "sct2_Concept_Snapshot_INT_20250101.txt"), "w", encoding="utf-8", newline="") as c, \
         open(os.path.join(term, "sct2_Description_Snapshot-en_INT_20250101.txt"), "w", encoding="utf-8", newline="") as d, \
         open(os.path.join(term, "sct2_Relationship_Snapshot_INT_20250101.txt"), "w", encoding="utf-8", newline="") as r, \
         open(os.path.join(lang, "der2_cRefset_LanguageSnapshot-en_INT_20250101.txt"), "w", encoding="utf-8", newline="") as l:
        c.write("id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\r\n")
        d.write("id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId\r\n")
        r.write("id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\r\n")
        l.write("id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\tacceptabilityId\r\n")
        for i, cid in enumerate(ids):
            active = "0" if (i > 0 and rng.random() < 0.03) else "1"
            defn = "900000000000073002" if rng.random() < 0.2 else "900000000000074008"
            c.write(f"{cid}\t20250101\t{active}\t{M}\t{defn}\r\n")
            name = phrase(rng, rng.randint(2, 4)).capitalize()
            for k in range(rng.choice((3, 4, 4, 5))):
                nd += 1
                did = str(200000000 + nd * 10)
                if k == 0:
                    d.write(f"{did}\t20250101\t1\t{M}\t{cid}\ten\t900000000000003001\t{name} (disorder)\t900000000000448009\r\n")
                else:
                    syn = name if k == 1 else phrase(rng, rng.randint(2, 4)).capitalize()
                    d.write(f"{did}\t20250101\t1\t{M}\t{cid}\ten\t900000000000013009\t{syn}\t900000000000448009\r\n")
                    acc = "900000000000548007" if k == 1 else "900000000000549004"
                    l.write(f"l{nd}\t20250101\t1\t{M}\t900000000000509007\t{did}\t{acc}\r\n")
            if i > 0:
                for p in {ids[rng.randrange(0, i)] for _ in range(rng.choice((1, 2, 3, 4, 4)))}:
                    nr += 1
                    r.write(f"{300000000 + nr * 10}\t20250101\t1\t{M}\t{cid}\t{p}\t0\t116680003\t900000000000011006\t900000000000451002\r\n")
    print(f"SNOMED: {n} concepts, {nd} descriptions, {nr} IS-A -> {base}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--loinc", type=int, default=100_000)
    ap.add_argument("--snomed", type=int, default=350_000)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.loinc:
        loinc(a.out, a.loinc, rng)
    if a.snomed:
        snomed(a.out, a.snomed, rng)


if __name__ == "__main__":
    main()
