// Usage: npm install fhirpath@4 (in some dir D), then NODE_PATH=D/node_modules node diff.js <examples dir> <out.jsonl> <search-parameters.json>
// Evaluates every R4 search parameter over every example with fhirpath.js (reference engine).
const fhirpath = require('fhirpath');
const model = require('fhirpath/fhir-context/r4');
const fs = require('fs');
const sps = JSON.parse(fs.readFileSync(process.argv[4])).entry.map(e => e.resource).filter(r => r.expression);
const dir = process.argv[2];
const files = fs.readdirSync(dir).filter(f => f.endsWith('.json')).sort();
const out = fs.createWriteStream(process.argv[3]);
const compiled = new Map();
let n = 0;
for (const f of files) {
  let res;
  try { res = JSON.parse(fs.readFileSync(dir + '/' + f)); } catch (e) { continue; }
  if (!res.resourceType) continue;
  for (const sp of sps) {
    if (!sp.base.some(b => b === res.resourceType || b === 'Resource' || b === 'DomainResource')) continue;
    let fn = compiled.get(sp.expression);
    if (!fn) { try { fn = fhirpath.compile(sp.expression, model, {resolveInternalTypes: true}); } catch (e) { fn = null; } compiled.set(sp.expression, fn); }
    let result;
    try { result = fn ? fn(res) : {error: 'compile'}; } catch (e) { result = {error: String(e.message || e).slice(0, 200)}; }
    out.write(JSON.stringify({file: f, expr: sp.expression, result}) + '\n');
    n++;
  }
}
out.end();
console.log('evaluations', n);
