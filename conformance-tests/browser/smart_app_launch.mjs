// Drives Debian's headless Chromium through SMART standalone launches against a running Kiln, like
// a user: the app's launch page (SMART's JS `fhirclient`) → Kiln's login page (a wrong password
// first, then the right one) → patient picker (when shown) → encounter picker (when shown) → consent page (one scope un-ticked) →
// the app's page, which completes the launch with PKCE and reads the patient.
//
// Usage: node smart_app_launch.mjs <config.json>
// config: { chromium, kilnBase, appBase, flows: [{ name, clientId, scope, username, password,
//           wrongPassword, searchPatient, pickPatient, pickEncounter, untick, probes, ehrLaunch }] }
// `searchPatient` types a name into the picker's search box first; `pickEncounter` answers the
// standalone encounter picker (`launch/encounter`).
// A flow with `ehrLaunch` ({client_id, patient, encounter}) signs in at Kiln first and starts an
// EHR launch from Kiln's /auth/ehr-launch (the app's registered launch_uri carries its settings).
// Prints one JSON object (the observations of every flow) on stdout; the Rust test asserts on it.
// Every request that leaves 127.0.0.1 is aborted and recorded.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const kilnOrigin = new URL(cfg.kilnBase).origin;
const TIMEOUT = 30000;

// What a page offers a screen-reader user: lang, title, every form control with its accessible
// label, buttons with text; external assets referenced by the markup.
function audit() {
  const controls = [];
  const problems = [];
  if (!document.documentElement.lang) problems.push("<html> has no lang attribute");
  if (!document.title.trim()) problems.push("no <title>");
  if (!document.querySelector("h1")) problems.push("no <h1>");
  for (const el of document.querySelectorAll("input, select, textarea")) {
    if (el.type === "hidden") continue;
    const labels = el.labels ? [...el.labels].map((l) => l.textContent.trim()).filter(Boolean) : [];
    const aria = el.getAttribute("aria-label") || "";
    const name = labels.join(" ") || aria;
    controls.push({ tag: el.tagName.toLowerCase(), type: el.type, name: el.name, label: name });
    if (!name) problems.push(`${el.tagName.toLowerCase()} name=${el.name} id=${el.id} has no label`);
  }
  for (const b of document.querySelectorAll("button")) {
    if (!b.textContent.trim() && !b.getAttribute("aria-label")) problems.push("a button has no text");
  }
  for (const el of document.querySelectorAll("[src], link[href]")) {
    const u = new URL(el.getAttribute("src") || el.getAttribute("href"), location.href);
    if (u.origin !== location.origin) problems.push(`external asset ${u.href}`);
  }
  const alert = document.querySelector("[role=alert]");
  return {
    url: location.href,
    lang: document.documentElement.lang,
    title: document.title,
    controls,
    problems,
    alert: alert ? alert.textContent.trim() : null,
  };
}

const isKiln = (u) => {
  try {
    return new URL(u).origin === kilnOrigin;
  } catch {
    return false;
  }
};

async function signIn(page, flow) {
  await page.getByLabel("User name").fill(flow.username);
  await page.getByLabel("Password", { exact: true }).fill(flow.password);
  await page.getByRole("button", { name: "Sign in" }).click();
}

async function runFlow(browser, flow, out) {
  const context = await browser.newContext();
  out.context = context;
  context.setDefaultTimeout(TIMEOUT);
  // Nothing may leave the machine: anything not on 127.0.0.1 is aborted and recorded.
  await context.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (u.hostname === "127.0.0.1") return route.continue();
    out.offMachine.push(u.href);
    return route.abort();
  });
  const page = await context.newPage();
  page.on("console", (m) => out.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
  // Sub-resources (not navigations) requested while a Kiln page is shown must stay on Kiln's origin.
  page.on("request", (r) => {
    if (r.isNavigationRequest()) {
      // the authorization request the app made (fhirclient builds it; PKCE parameters in it)
      if (isKiln(r.url()) && new URL(r.url()).pathname.endsWith("/auth/authorize")) out.authorizeRequest = r.url();
      // the app's launch page as opened (an EHR launch adds iss and launch)
      if (r.url().startsWith(cfg.appBase + "/launch.html")) out.launchRequest = r.url();
      return;
    }
    let frameUrl = "";
    try {
      frameUrl = r.frame().url();
    } catch {}
    if (isKiln(frameUrl)) {
      out.kilnSubresources.push(r.url());
      if (!isKiln(r.url())) out.foreignFromKiln.push(r.url());
    }
  });

  if (flow.ehrLaunch) {
    // EHR launch: the user signs in to Kiln (the EHR) first and launches the app from there;
    // Kiln redirects to the app's registered launch_uri with iss and launch.
    await page.goto(cfg.kilnBase + "/auth/login");
    out.pages.login = await page.evaluate(audit);
    await signIn(page, flow);
    await page.waitForLoadState();
    out.signedIn = await page.evaluate(audit);
    const ehr = new URL(cfg.kilnBase + "/auth/ehr-launch");
    for (const [k, v] of Object.entries(flow.ehrLaunch)) ehr.searchParams.set(k, v);
    await page.goto(ehr.href);
    await page.waitForURL((u) => /\/auth\/(login|select-patient|consent)/.test(u.href));
    if (page.url().includes("/auth/login")) throw new Error("the EHR launch asked to sign in again");
  } else {
    // Standalone launch: the user opens the app, which knows its FHIR server.
    const launch = new URL(cfg.appBase + "/launch.html");
    launch.searchParams.set("app_client_id", flow.clientId);
    launch.searchParams.set("app_scope", flow.scope);
    launch.searchParams.set("app_iss", cfg.kilnBase);
    launch.searchParams.set("app_probes", JSON.stringify(flow.probes || []));
    await page.goto(launch.href);

    // 1. Kiln's login page.
    await page.waitForURL((u) => u.href.startsWith(cfg.kilnBase + "/auth/login"));
    out.pages.login = await page.evaluate(audit);
    if (flow.wrongPassword) {
      await page.getByLabel("User name").fill(flow.username);
      await page.getByLabel("Password", { exact: true }).fill(flow.password + "-wrong");
      const [resp] = await Promise.all([
        page.waitForResponse((r) => isKiln(r.url()) && r.request().method() === "POST"),
        page.getByRole("button", { name: "Sign in" }).click(),
      ]);
      await page.waitForLoadState();
      out.wrongPassword = { status: resp.status(), ...(await page.evaluate(audit)) };
    }
    await signIn(page, flow);
  }

  // 2. Patient picker, if Kiln shows one (searched by name when the flow says so); then the
  // encounter picker (standalone launch/encounter), if shown; then the consent page.
  await page.waitForURL((u) => /\/auth\/(select-patient|select-encounter|consent)/.test(u.href));
  if (page.url().includes("/auth/select-patient")) {
    out.pages.picker = await page.evaluate(audit);
    if (flow.searchPatient) {
      await page.getByLabel("Search patients by name or identifier").fill(flow.searchPatient);
      await page.getByRole("button", { name: "Search" }).click();
      await page.waitForURL((u) => u.searchParams.get("q") === flow.searchPatient);
      out.pages.pickerSearch = await page.evaluate(audit);
    }
    await page.getByRole("radio", { name: new RegExp(flow.pickPatient) }).check();
    await page.getByRole("button", { name: "Continue" }).click();
    await page.waitForURL((u) => /\/auth\/(select-encounter|consent)/.test(u.href));
  }
  if (page.url().includes("/auth/select-encounter")) {
    out.pages.encounterPicker = await page.evaluate(audit);
    if (!flow.pickEncounter) throw new Error("encounter picker shown, nothing to pick");
    await page.getByRole("radio", { name: new RegExp(flow.pickEncounter) }).check();
    await page.getByRole("button", { name: "Continue" }).click();
    await page.waitForURL((u) => u.href.includes("/auth/consent"));
  }
  out.pages.consent = await page.evaluate(audit);
  if (flow.untick) {
    const box = page.getByRole("checkbox", { name: new RegExp(flow.untick.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&") + "$") });
    await box.uncheck();
    out.unticked = flow.untick;
  }
  await page.getByRole("button", { name: "Allow" }).click();

  // 3. Back in the app: fhirclient exchanges the code (PKCE) and reads the patient.
  await page.waitForURL((u) => u.href.startsWith(cfg.appBase + "/index.html"));
  out.callbackUrl = page.url();
  await page.waitForFunction(
    () => document.getElementById("result").textContent || document.getElementById("error").textContent,
  );
  const result = await page.locator("#result").textContent();
  out.appError = (await page.locator("#error").textContent()) || null;
  out.app = result ? JSON.parse(result) : null;
  out.shownName = await page.locator("#name").textContent();
}

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const results = { chromium: browser.version(), flows: [] };
try {
  for (const flow of cfg.flows) {
    const out = { name: flow.name, pages: {}, offMachine: [], kilnSubresources: [], foreignFromKiln: [], console: [] };
    try {
      await runFlow(browser, flow, out);
    } catch (e) {
      out.failure = String(e && e.stack ? e.stack : e);
      // where it stopped, for the failure message
      const page = out.context && out.context.pages()[0];
      if (page) {
        out.lastUrl = page.url();
        out.lastText = (await page.locator("body").innerText().catch(() => "")).slice(0, 2000);
      }
    }
    if (out.context) await out.context.close();
    delete out.context;
    results.flows.push(out);
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(results) + "\n");
