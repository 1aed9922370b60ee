#!/usr/bin/env python3
"""Generates synthetic LOINC and SNOMED CT releases in the official file layouts, for load and
search benchmarks (the real content is licensed and not available here). Content is random but
shaped like the real thing: LOINC 6-axis names, parts, primary part links, answer lists and the
multiaxial hierarchy; SNOMED concepts with an FSN, synonyms, US and GB English language refsets,
an inferred IS-A DAG (several parents), simple refsets, historical associations for inactive
concepts and an ICD-10 extended map.

Usage: python3 terminology/tools/gen_synthetic.py OUT_DIR [--loinc 100000] [--snomed 350000]
       (defaults give 100k LOINC terms with ~500k part links; 350k SNOMED concepts, ~1.5M
       descriptions, ~1M inferred IS-A rows)
Then:  kiln-tx-bench load loinc OUT_DIR/loinc STORE   (or `kiln terminology load loinc …`)
       kiln-tx-bench load snomed OUT_DIR/snomed STORE
       kiln-tx-bench OUT_DIR                           (load + query timings)
"""
import argparse, csv, os, random, uuid

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
ATTRS = ["363698007", "116676008", "246075003", "363714003", "370135005", "408729009", "272741003"]
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
    # axis parts, primary part links, answer lists
    pdir = os.path.join(base, "AccessoryFiles", "PartFile")
    adir = os.path.join(base, "AccessoryFiles", "AnswerFile")
    os.makedirs(pdir, exist_ok=True)
    os.makedirs(adir, exist_ok=True)
    axes = [("COMPONENT", "COMPONENT", [w.capitalize() for w in WORDS]), ("PROPERTY", "PROPERTY", PROPS),
            ("TIME", "TIME_ASPCT", ["Pt", "24H"]), ("SYSTEM", "SYSTEM", SYSTEMS), ("SCALE", "SCALE_TYP", SCALES)]
    axis_parts = {}
    k = 0
    with open(os.path.join(pdir, "Part.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        w.writerow(["PartNumber", "PartTypeName", "PartName", "PartDisplayName", "Status"])
        for p in parts:
            w.writerow([p, "COMPONENT", p, p, "ACTIVE"])
        for ptype, prop, names in axes:
            for name in names:
                k += 1
                num = f"LP{900000 + k}-{k % 10}"
                axis_parts[(prop, name)] = num
                w.writerow([num, ptype, name, name, "ACTIVE"])
    links = 0
    rng2 = random.Random(7)
    with open(os.path.join(base, "LoincTable", "Loinc.csv"), newline="", encoding="utf-8") as f, \
         open(os.path.join(pdir, "LoincPartLink_Primary.csv"), "w", newline="", encoding="utf-8") as lf, \
         open(os.path.join(adir, "LoincAnswerListLink.csv"), "w", newline="", encoding="utf-8") as alf:
        lw = csv.writer(lf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        lw.writerow(["LoincNumber", "LongCommonName", "PartNumber", "PartName", "PartCodeSystem",
                     "PartTypeName", "LinkTypeName", "Property"])
        aw = csv.writer(alf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        aw.writerow(["LoincNumber", "LongCommonName", "AnswerListId", "AnswerListName",
                     "AnswerListLinkType", "ApplicableContext"])
        nlists = max(10, n // 50)
        for row in csv.DictReader(f):
            for ptype, prop, names in axes:
                val = row[prop]
                if prop == "COMPONENT":
                    val = val.split(" ")[0].capitalize()
                num = axis_parts.get((prop, val))
                if num:
                    links += 1
                    lw.writerow([row["LOINC_NUM"], row["LONG_COMMON_NAME"], num, val, "http://loinc.org",
                                 ptype, "Primary", f"http://loinc.org/property/{prop}"])
            if row["SCALE_TYP"] in ("Ord", "Nom") and rng2.random() < 0.2:
                ll = rng2.randrange(nlists)
                aw.writerow([row["LOINC_NUM"], row["LONG_COMMON_NAME"], f"LL{1000 + ll}-{ll % 10}",
                             f"Answer list {ll}", "NORMATIVE", ""])
    cols = ["AnswerListId", "AnswerListName", "AnswerListOID", "ExtDefinedYN", "ExtDefinedAnswerListCodeSystem",
            "ExtDefinedAnswerListLink", "AnswerStringId", "LocalAnswerCode", "LocalAnswerCodeSystem",
            "SequenceNumber", "DisplayText", "ExtCodeId", "ExtCodeDisplayName", "ExtCodeSystem",
            "ExtCodeSystemVersion", "ExtCodeSystemCopyrightNotice", "SubsequentTextPrompt", "Description", "Score"]
    with open(os.path.join(adir, "AnswerList.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        w.writerow(cols)
        for ll in range(nlists):
            for seq in range(1, rng.randint(2, 8)):
                la = rng.randrange(n // 10 + 10)
                r = {c: "" for c in cols}
                r.update(AnswerListId=f"LL{1000 + ll}-{ll % 10}", AnswerListName=f"Answer list {ll}",
                         ExtDefinedYN="N", AnswerStringId=f"LA{10000 + la}-{la % 10}", SequenceNumber=str(seq),
                         DisplayText=phrase(rng, 2).capitalize())
                w.writerow([r[c] for c in cols])
    print(f"LOINC: {n} terms, {len(parts) + len(axis_parts)} parts, {links} part links, {nlists} answer lists -> {base}")


def snomed(out, n, rng):
    base = os.path.join(out, "snomed", "Snapshot")
    term = os.path.join(base, "Terminology")
    lang = os.path.join(base, "Refset", "Language")
    os.makedirs(term, exist_ok=True)
    os.makedirs(lang, exist_ok=True)
    M = "900000000000207008"
    ids = [str(138875005)] + [str(100000000 + i * 10) for i in range(1, n)]
    nd = nr = na = 0
    inactive = []

    def lid(n, dialect):
        return str(uuid.UUID(int=(n << 1) | dialect))
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
            if active == "0":
                inactive.append(cid)
            defn = "900000000000073002" if rng.random() < 0.2 else "900000000000074008"
            c.write(f"{cid}\t20250101\t{active}\t{M}\t{defn}\r\n")
            name = phrase(rng, rng.randint(2, 4)).capitalize()
            for k in range(rng.choice((4, 4, 4, 5, 5))):
                nd += 1
                did = str(200000000 + nd * 10)
                if k == 0:
                    d.write(f"{did}\t20250101\t1\t{M}\t{cid}\ten\t900000000000003001\t{name} (disorder)\t900000000000448009\r\n")
                else:
                    syn = name if k == 1 else phrase(rng, rng.randint(2, 4)).capitalize()
                    d.write(f"{did}\t20250101\t1\t{M}\t{cid}\ten\t900000000000013009\t{syn}\t900000000000448009\r\n")
                    acc = "900000000000548007" if k == 1 else "900000000000549004"
                    l.write(f"{lid(nd, 0)}\t20250101\t1\t{M}\t900000000000509007\t{did}\t{acc}\r\n")
                    # GB English: mostly the same preferred term, sometimes another synonym
                    gb_pref = (k == 1) if rng.random() < 0.9 else (k == 2)
                    gacc = "900000000000548007" if gb_pref else "900000000000549004"
                    l.write(f"{lid(nd, 1)}\t20250101\t1\t{M}\t900000000000508004\t{did}\t{gacc}\r\n")
            if i > 0:
                for p in {ids[rng.randrange(0, i)] for _ in range(rng.choice((1, 2, 3, 4, 4, 5)))}:
                    nr += 1
                    r.write(f"{300000000 + nr * 10}\t20250101\t1\t{M}\t{cid}\t{p}\t0\t116680003\t900000000000011006\t900000000000451002\r\n")
                # attribute relationships (finding site, associated morphology, causative agent, …)
                for g in range(rng.choice((0, 1, 2, 2, 3, 4))):
                    na += 1
                    r.write(f"{500000000 + na * 10}\t20250101\t1\t{M}\t{cid}\t{rng.choice(ids)}\t{g // 2 + 1}"
                            f"\t{rng.choice(ATTRS)}\t900000000000011006\t900000000000451002\r\n")
    # simple refsets, historical associations of inactive concepts, ICD-10 extended map
    content = os.path.join(base, "Refset", "Content")
    mapdir = os.path.join(base, "Refset", "Map")
    os.makedirs(content, exist_ok=True)
    os.makedirs(mapdir, exist_ok=True)
    refsets = [ids[1 + k] for k in range(5)]
    members = 0
    with open(os.path.join(content, "der2_Refset_SimpleSnapshot_INT_20250101.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\r\n")
        for r in refsets:
            for c in rng.sample(ids, min(10_000, len(ids) // 10)):
                members += 1
                f.write(f"{uuid.UUID(int=members << 8)}\t20250101\t1\t{M}\t{r}\t{c}\r\n")
    with open(os.path.join(content, "der2_cRefset_AssociationSnapshot_INT_20250101.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\ttargetComponentId\r\n")
        for k, c in enumerate(inactive):
            refset = "900000000000526001" if k % 3 else "900000000000527005"
            f.write(f"{uuid.UUID(int=(k << 8) | 1)}\t20250101\t1\t{M}\t{refset}\t{c}\t{rng.choice(ids)}\r\n")
    nmap = 0
    with open(os.path.join(mapdir, "der2_iisssccRefset_ExtendedMapSnapshot_INT_20250101.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\tmapGroup\tmapPriority"
                "\tmapRule\tmapAdvice\tmapTarget\tcorrelationId\tmapCategoryId\r\n")
        for c in rng.sample(ids, len(ids) // 3):
            nmap += 1
            tgt = f"{rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ')}{rng.randrange(100):02d}.{rng.randrange(10)}"
            f.write(f"{uuid.UUID(int=(nmap << 8) | 2)}\t20250101\t1\t{M}\t447562003\t{c}\t1\t1\tTRUE"
                    f"\tALWAYS {tgt}\t{tgt}\t447561005\t447637006\r\n")
    print(f"SNOMED: {n} concepts ({len(inactive)} inactive), {nd} descriptions, {nr} IS-A, {na} attribute rows, "
          f"{members} refset members, {len(inactive)} associations, {nmap} ICD-10 map rows -> {base}")


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
