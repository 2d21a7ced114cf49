#!/usr/bin/env node
// Checks of the shardguard Helm chart that need more than helm and promtool
// (tests/chart/chart_test.sh runs them):
//
//   node check_chart.mjs split RENDERED.yaml OUT.yaml
//       Writes every object whose kind kubernetes-models knows to OUT.yaml (for
//       tests/schema/validate.mjs) and checks the monitoring.coreos.com/v1 ones
//       (ServiceMonitor, PodMonitor, PrometheusRule: not in kubernetes-models)
//       structurally against the fields of the Prometheus Operator CRDs the chart uses.
//   node check_chart.mjs objects default|full RENDERED.yaml REPO
//       What the chart must render for tests/chart/values-full.yaml or the defaults:
//       probes, securityContext, leader election, the RBAC rules against
//       deploy/operator.yaml, monitors, PrometheusRule = files/alerts.yaml, dashboards.
//   node check_chart.mjs rbac FILE.yaml [KIND]
//       Who may write a job's status: every Role and ClusterRole in FILE (a rendered
//       chart or deploy/operator.yaml), evaluated as the RBAC authorizer matches rules
//       (apiGroups/resources/verbs with "*", "*/status", "shardedtrainingjobs/*").
//       Fails when a role not bound to the operator's ServiceAccount grants create,
//       update, patch or * on shardedtrainingjobs/status, when the operator's roles do
//       not grant update on it or carry aggregate-to-* labels (that would hand status to
//       every admin/edit/view user), and, with KIND "users", unless <..>-edit is
//       aggregated to admin and edit with the job verbs and <..>-view to view, read-only.
//   node check_chart.mjs dashboards REPO OUT_RULES.yaml
//       Every dashboard: valid JSON, unique panel ids, the datasource, namespace and job
//       variables, every query on ${datasource}. Writes each PromQL expression as a
//       recording rule to OUT_RULES.yaml so that `promtool check rules` parses it.
//   node check_chart.mjs metrics REPO
//       Every metric named in the dashboards and in files/alerts.yaml is registered in
//       the sources (operator/, shardd/, sidecar/, common/). A quick static check on
//       string literals; the live one (names from real /metrics pages scraped by a real
//       Prometheus) is tests/integration/monitoring_e2e_test.cpp.
//   node check_chart.mjs queries REPO OUT.json
//       Every dashboard and alert expression, runnable as PromQL, with its metric names
//       (input of the monitoring end-to-end test).
//
// Exit 0 when everything holds, 1 on a failed check, 2 on a usage error or missing
// tooling ("run make deps").
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repoRootDefault = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const toolsDir = path.resolve(process.env.SHARDGUARD_TOOLS_DIR || path.join(repoRootDefault, "tools"));
function die(msg, code = 2) {
  process.stderr.write(`check_chart.mjs: ${msg}\n`);
  process.exit(code);
}
if (!fs.existsSync(path.join(toolsDir, "node_modules", "yaml"))) {
  die(`${path.join(toolsDir, "node_modules")} has no yaml package; run \`make deps\``);
}
const YAML = createRequire(path.join(toolsDir, "package.json"))("yaml");

let failures = 0;
function fail(msg) {
  failures++;
  process.stdout.write(`FAIL ${msg}\n`);
}
function ok(msg) {
  process.stdout.write(`ok   ${msg}\n`);
}
function check(cond, msg) {
  if (cond) ok(msg);
  else fail(msg);
  return cond;
}
function loadDocs(file) {
  return YAML.parseAllDocuments(fs.readFileSync(file, "utf8"))
    .map((d) => {
      if (d.errors.length) die(`${file}: ${d.errors[0].message}`);
      return d.toJS();
    })
    .filter((o) => o && typeof o === "object");
}
const idOf = (o) => `${o.kind} ${o.metadata?.namespace ? o.metadata.namespace + "/" : ""}${o.metadata?.name}`;
// JSON with sorted keys (helm's toYaml sorts them).
const canon = (v) => Array.isArray(v) ? `[${v.map(canon).join(",")}]`
  : v !== null && typeof v === "object" ? `{${Object.keys(v).sort().map((k) => JSON.stringify(k) + ":" + canon(v[k])).join(",")}}`
  : JSON.stringify(v);
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const stringMap = (v) => isObj(v) && Object.values(v).every((x) => typeof x === "string");
const duration = (v) => typeof v === "string" && /^([0-9]+(ms|s|m|h|d|w|y))+$/.test(v);
const dnsName = (v) => typeof v === "string" && /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(v);

// ---- structural checks of the monitoring.coreos.com/v1 kinds ---------------------
// Only the fields of the Prometheus Operator CRDs this chart writes; anything else is
// an error, so that a typo (honorLabel, podMetricEndpoints) cannot slip through.
function unknownKeys(obj, allowed, where, errs) {
  for (const k of Object.keys(obj)) if (!allowed.includes(k)) errs.push(`${where}.${k} is not a field the chart may use`);
}
function checkSelector(sel, where, errs) {
  if (!isObj(sel)) return errs.push(`${where} must be an object`);
  unknownKeys(sel, ["matchLabels", "matchExpressions"], where, errs);
  if (sel.matchLabels !== undefined && !stringMap(sel.matchLabels)) errs.push(`${where}.matchLabels must map strings to strings`);
  for (const [i, e] of (sel.matchExpressions || []).entries()) {
    if (typeof e.key !== "string" || !["In", "NotIn", "Exists", "DoesNotExist"].includes(e.operator))
      errs.push(`${where}.matchExpressions[${i}] needs key and operator In|NotIn|Exists|DoesNotExist`);
  }
}
function checkNamespaceSelector(ns, where, errs) {
  if (!isObj(ns)) return errs.push(`${where} must be an object`);
  unknownKeys(ns, ["any", "matchNames"], where, errs);
  if (ns.any !== undefined && typeof ns.any !== "boolean") errs.push(`${where}.any must be boolean`);
  if (ns.matchNames !== undefined && !(Array.isArray(ns.matchNames) && ns.matchNames.every(dnsName)))
    errs.push(`${where}.matchNames must be namespace names`);
  if (ns.any && ns.matchNames) errs.push(`${where}: any and matchNames together`);
}
function checkEndpoint(ep, where, errs) {
  if (!isObj(ep)) return errs.push(`${where} must be an object`);
  unknownKeys(ep, ["port", "path", "scheme", "honorLabels", "interval", "scrapeTimeout", "relabelings"], where, errs);
  if (typeof ep.port !== "string" || !ep.port) errs.push(`${where}.port must be a port name`);
  if (ep.path !== undefined && !(typeof ep.path === "string" && ep.path.startsWith("/"))) errs.push(`${where}.path must start with /`);
  if (ep.scheme !== undefined && !["http", "https"].includes(ep.scheme)) errs.push(`${where}.scheme must be http or https`);
  if (ep.honorLabels !== undefined && typeof ep.honorLabels !== "boolean") errs.push(`${where}.honorLabels must be boolean`);
  for (const k of ["interval", "scrapeTimeout"]) if (ep[k] !== undefined && !duration(ep[k])) errs.push(`${where}.${k} must be a duration`);
  for (const [i, r] of (ep.relabelings || []).entries()) {
    const w = `${where}.relabelings[${i}]`;
    if (!isObj(r)) { errs.push(`${w} must be an object`); continue; }
    unknownKeys(r, ["sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"], w, errs);
    if (r.sourceLabels && !(Array.isArray(r.sourceLabels) && r.sourceLabels.every((l) => /^[a-zA-Z_][a-zA-Z0-9_]*$/.test(l))))
      errs.push(`${w}.sourceLabels must be label names`);
    if (r.targetLabel !== undefined && !/^[a-zA-Z_][a-zA-Z0-9_]*$/.test(r.targetLabel)) errs.push(`${w}.targetLabel must be a label name`);
  }
}
function checkRuleGroups(groups, where, errs) {
  if (!Array.isArray(groups) || !groups.length) return errs.push(`${where} must be a non-empty array`);
  for (const [gi, g] of groups.entries()) {
    const w = `${where}[${gi}]`;
    unknownKeys(g, ["name", "interval", "rules"], w, errs);
    if (typeof g.name !== "string" || !g.name) errs.push(`${w}.name missing`);
    for (const [ri, r] of (g.rules || []).entries()) {
      const rw = `${w}.rules[${ri}]`;
      unknownKeys(r, ["alert", "record", "expr", "for", "labels", "annotations"], rw, errs);
      if (!!r.alert === !!r.record) errs.push(`${rw} needs exactly one of alert and record`);
      if (typeof r.expr !== "string" || !r.expr.trim()) errs.push(`${rw}.expr must be a PromQL string`);
      if (r.for !== undefined && !duration(r.for)) errs.push(`${rw}.for must be a duration`);
      if (r.labels !== undefined && !stringMap(r.labels)) errs.push(`${rw}.labels must map strings to strings`);
      if (r.annotations !== undefined && !stringMap(r.annotations)) errs.push(`${rw}.annotations must map strings to strings`);
    }
  }
}
function checkMonitoring(o) {
  const errs = [];
  const m = o.metadata || {};
  if (!dnsName(m.name) || !dnsName(m.namespace)) errs.push("metadata.name and metadata.namespace must be DNS names");
  if (m.labels !== undefined && !stringMap(m.labels)) errs.push("metadata.labels must map strings to strings");
  const s = o.spec;
  if (!isObj(s)) errs.push("spec must be an object");
  else if (o.kind === "ServiceMonitor") {
    unknownKeys(s, ["selector", "namespaceSelector", "endpoints", "jobLabel"], "spec", errs);
    checkSelector(s.selector, "spec.selector", errs);
    if (s.namespaceSelector) checkNamespaceSelector(s.namespaceSelector, "spec.namespaceSelector", errs);
    if (!Array.isArray(s.endpoints) || !s.endpoints.length) errs.push("spec.endpoints must be a non-empty array");
    else s.endpoints.forEach((e, i) => checkEndpoint(e, `spec.endpoints[${i}]`, errs));
  } else if (o.kind === "PodMonitor") {
    unknownKeys(s, ["selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"], "spec", errs);
    checkSelector(s.selector, "spec.selector", errs);
    if (s.namespaceSelector) checkNamespaceSelector(s.namespaceSelector, "spec.namespaceSelector", errs);
    if (s.jobLabel !== undefined && typeof s.jobLabel !== "string") errs.push("spec.jobLabel must be a string");
    if (!Array.isArray(s.podMetricsEndpoints) || !s.podMetricsEndpoints.length) errs.push("spec.podMetricsEndpoints must be a non-empty array");
    else s.podMetricsEndpoints.forEach((e, i) => checkEndpoint(e, `spec.podMetricsEndpoints[${i}]`, errs));
  } else if (o.kind === "PrometheusRule") {
    unknownKeys(s, ["groups"], "spec", errs);
    checkRuleGroups(s.groups, "spec.groups", errs);
  } else errs.push(`unknown monitoring.coreos.com kind ${o.kind}`);
  return errs;
}

function cmdSplit(rendered, out) {
  const docs = loadDocs(rendered);
  const rest = [];
  for (const o of docs) {
    if (typeof o.apiVersion === "string" && o.apiVersion.startsWith("monitoring.coreos.com/")) {
      process.stdout.write(`skip ${idOf(o)}: kubernetes-models has no monitoring.coreos.com schemas; checked structurally\n`);
      const errs = o.apiVersion === "monitoring.coreos.com/v1" ? checkMonitoring(o) : [`apiVersion ${o.apiVersion} (want monitoring.coreos.com/v1)`];
      check(errs.length === 0, `${idOf(o)} structure${errs.length ? ": " + errs.join("; ") : ""}`);
    } else rest.push(o);
  }
  fs.writeFileSync(out, rest.map((o) => YAML.stringify(o)).join("---\n"));
  process.stdout.write(`${rest.length} object(s) left for validate.mjs\n`);
}

// ---- who may write status ---------------------------------------------------------
const AGGREGATE = /^rbac\.authorization\.k8s\.io\/aggregate-to-/;
const isAggregated = (r) => Object.keys(r.metadata?.labels || {}).some((k) => AGGREGATE.test(k));
const STATUS_WRITES = ["create", "update", "patch"];
// Does `rule` grant `verb` on shardguard.io's shardedtrainingjobs[/sub]? As the RBAC
// authorizer matches: "*" anywhere, "*/sub" for a subresource of any resource,
// "resource/*" for every subresource of one. resourceNames narrow a grant, they do
// not remove it, so a rule with them still counts.
function grants(rule, resource, verb) {
  const [res, sub] = resource.split("/");
  const groupOk = (rule.apiGroups || []).some((g) => g === "*" || g === "shardguard.io");
  const resOk = (rule.resources || []).some((r) =>
    r === "*" || r === resource || (sub && (r === `*/${sub}` || r === `${res}/*`)));
  const verbOk = (rule.verbs || []).some((v) => v === "*" || v === verb);
  return groupOk && resOk && verbOk;
}
const roleGrants = (role, resource, verb) => (role.rules || []).some((r) => grants(r, resource, verb));

function cmdRbac(file, kindOfCheck) {
  const docs = loadDocs(file);
  const dep = docs.filter((o) => o.kind === "Deployment");
  if (!check(dep.length === 1, `${file}: one Deployment (whose ServiceAccount is the operator's)`)) return;
  const sa = { name: dep[0].spec.template.spec.serviceAccountName || "default", namespace: dep[0].metadata.namespace };
  const roles = docs.filter((o) => o.kind === "Role" || o.kind === "ClusterRole");
  const bindings = docs.filter((o) => o.kind === "RoleBinding" || o.kind === "ClusterRoleBinding");
  const boundToOperator = new Set();
  for (const b of bindings) {
    const toSa = (b.subjects || []).some((s) => s.kind === "ServiceAccount" && s.name === sa.name &&
      (s.namespace || b.metadata.namespace) === sa.namespace);
    if (!toSa) continue;
    const target = roles.find((r) => r.kind === b.roleRef.kind && r.metadata.name === b.roleRef.name &&
      (r.kind === "ClusterRole" || r.metadata.namespace === b.metadata.namespace));
    if (target) boundToOperator.add(target);
  }
  const operatorRoles = roles.filter((r) => boundToOperator.has(r));
  const others = roles.filter((r) => !boundToOperator.has(r));
  check(operatorRoles.length > 0, `${operatorRoles.length} role(s) bound to ServiceAccount ${sa.namespace}/${sa.name}`);
  for (const r of others) {
    const bad = ["*", ...STATUS_WRITES].filter((v) => roleGrants(r, "shardedtrainingjobs/status", v));
    check(bad.length === 0, `${idOf(r)} (not the operator's) grants no write of shardedtrainingjobs/status` +
      (bad.length ? `: it grants ${bad.join(", ")}` : ""));
  }
  for (const r of operatorRoles) {
    check(!isAggregated(r), `${idOf(r)} (the operator's) is not aggregated into user roles`);
  }
  // The operator needs update on status in every place it reconciles: the ClusterRole,
  // or the Role of every watched namespace.
  const jobRoles = operatorRoles.filter((r) => roleGrants(r, "shardedtrainingjobs", "list"));
  check(jobRoles.length > 0 && jobRoles.every((r) => roleGrants(r, "shardedtrainingjobs/status", "update")),
        `the operator's job role(s) grant update on shardedtrainingjobs/status (${jobRoles.map(idOf).join(", ")})`);
  if (kindOfCheck !== "users") return;
  const edit = others.find((r) => r.kind === "ClusterRole" && r.metadata.name.endsWith("-edit"));
  const view = others.find((r) => r.kind === "ClusterRole" && r.metadata.name.endsWith("-view"));
  const labels = (r) => r?.metadata?.labels || {};
  check(edit && labels(edit)["rbac.authorization.k8s.io/aggregate-to-admin"] === "true" &&
        labels(edit)["rbac.authorization.k8s.io/aggregate-to-edit"] === "true" &&
        ["get", "list", "watch", "create", "update", "patch", "delete"].every((v) => roleGrants(edit, "shardedtrainingjobs", v)) &&
        ["get", "list", "watch"].every((v) => roleGrants(edit, "shardedtrainingjobs/status", v)),
        `${edit ? idOf(edit) : "an -edit ClusterRole"}: aggregated to admin and edit, the job verbs, status read-only`);
  check(view && labels(view)["rbac.authorization.k8s.io/aggregate-to-view"] === "true" &&
        ["get", "list", "watch"].every((v) => roleGrants(view, "shardedtrainingjobs", v)) &&
        !["create", "update", "patch", "delete", "*"].some((v) => roleGrants(view, "shardedtrainingjobs", v)),
        `${view ? idOf(view) : "a -view ClusterRole"}: aggregated to view, read-only`);
}

// ---- what the chart renders -------------------------------------------------------
const norm = (rules) =>
  JSON.stringify(
    rules
      .map((r) => ({
        apiGroups: [...r.apiGroups].sort(),
        resources: [...r.resources].sort(),
        verbs: [...r.verbs].sort(),
        ...(r.resourceNames ? { resourceNames: [...r.resourceNames].sort() } : {}),
      }))
      .sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b))),
  );
// Lease verbs, with or without resourceNames.
const leaseVerbs = (rules) =>
  [...new Set(rules.filter((r) => r.resources.includes("leases")).flatMap((r) => r.verbs))].sort().join(",");

function cmdObjects(mode, rendered, repo) {
  const docs = loadDocs(rendered);
  const deploy = loadDocs(path.join(repo, "deploy", "operator.yaml"));
  const want = deploy.find((o) => o.kind === "ClusterRole" && o.metadata.name === "shardguard-operator");
  const wantLease = deploy.find((o) => o.kind === "Role");
  const kinds = (k) => docs.filter((o) => o.kind === k);
  const dep = kinds("Deployment");
  if (!check(dep.length === 1, "one Deployment")) return;
  const pod = dep[0].spec.template.spec;
  const c = pod.containers[0];
  const args = c.args || [];
  check(c.livenessProbe?.httpGet?.path === "/healthz" && c.readinessProbe?.httpGet?.path === "/readyz" &&
        c.livenessProbe.httpGet.port === "health" && c.readinessProbe.httpGet.port === "health",
        "liveness /healthz and readiness /readyz on the health port");
  const health = c.ports.find((p) => p.name === "health")?.containerPort;
  const metrics = c.ports.find((p) => p.name === "metrics")?.containerPort;
  check(args.includes(`--health-probe-bind-address=:${health}`) && args.includes(`--metrics-bind-address=:${metrics}`),
        `--health-probe-bind-address :${health} and --metrics-bind-address :${metrics} match the container ports`);
  const sc = c.securityContext || {};
  const psc = pod.securityContext || {};
  check(psc.runAsNonRoot === true && psc.seccompProfile?.type === "RuntimeDefault" && sc.allowPrivilegeEscalation === false &&
        sc.readOnlyRootFilesystem === true && sc.capabilities?.drop?.includes("ALL") && sc.privileged === false,
        "restricted securityContext (non-root, RuntimeDefault seccomp, no escalation, read-only root, drop ALL)");
  check(c.resources?.requests?.memory && c.resources?.limits?.memory, "memory request and limit");
  const leader = args.includes("--leader-elect");
  // The operator's ClusterRoles (not the aggregated ones for people: case rbac).
  const crs = kinds("ClusterRole").filter((r) => !isAggregated(r));
  const roles = kinds("Role");
  const leaseRoles = roles.filter((r) => r.rules.some((x) => x.resources.includes("leases")));
  const jobRoles = roles.filter((r) => !leaseRoles.includes(r));
  if (leader) {
    check(leaseRoles.length === 1 && leaseRoles[0].metadata.namespace === dep[0].metadata.namespace &&
          leaseVerbs(leaseRoles[0].rules) === leaseVerbs(wantLease.rules),
          `leader election: a Lease Role in the release namespace with the verbs of deploy/operator.yaml (${leaseVerbs(wantLease.rules)})`);
    check(args.some((a) => a.startsWith("--leader-election-namespace=")), "--leader-election-namespace set");
    check(dep[0].spec.strategy?.type === "RollingUpdate", "RollingUpdate with leader election");
  } else {
    check(leaseRoles.length === 0, "no Lease Role without leader election");
    check(dep[0].spec.strategy?.type === "Recreate", "Recreate without leader election (never two operators at once)");
  }
  // Bindings point at what exists, for the chart's ServiceAccount.
  const sa = pod.serviceAccountName;
  for (const b of [...kinds("ClusterRoleBinding"), ...kinds("RoleBinding")]) {
    const target = docs.find((o) => o.kind === b.roleRef.kind && o.metadata.name === b.roleRef.name &&
      (o.kind === "ClusterRole" || o.metadata.namespace === b.metadata.namespace));
    check(target && b.subjects.length === 1 && b.subjects[0].name === sa && b.subjects[0].namespace === dep[0].metadata.namespace,
          `${idOf(b)} binds ${b.roleRef.kind} ${b.roleRef.name} to ServiceAccount ${sa}`);
  }
  check(kinds("ServiceAccount").some((s) => s.metadata.name === sa), `ServiceAccount ${sa} rendered`);
  const svc = kinds("Service");
  check(svc.length === 1 && svc[0].spec.ports[0].targetPort === "metrics", "metrics Service on the metrics port");

  if (mode === "default") {
    check(!leader, "no --leader-elect by default (1 replica)");
    check(crs.length === 1 && jobRoles.length === 0, "all namespaces: one ClusterRole, no Roles");
    check(crs.length === 1 && norm(crs[0].rules) === norm(want.rules), "ClusterRole rules = deploy/operator.yaml's (least privilege)");
    check(!args.some((a) => a.startsWith("--namespace")), "no --namespace: every namespace");
    for (const k of ["ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"]) check(kinds(k).length === 0, `no ${k} by default`);
    check(c.image === "ghcr.io/shardguard/shardguard-operator:0.1.0", `operator image ${c.image}`);
    check(args.includes("--shardd-image=ghcr.io/shardguard/shardd:0.1.0") &&
          args.includes("--sidecar-image=ghcr.io/shardguard/shard-sidecar:0.1.0"),
          "shardd and sidecar images = the operator's own defaults (docs/operator.md)");
    return;
  }
  // full (tests/chart/values-full.yaml)
  check(leader, "--leader-elect with 2 replicas although leaderElection.enabled is false");
  check(crs.length === 0 && kinds("ClusterRoleBinding").length === 0, "watchNamespaces: no ClusterRole, no ClusterRoleBinding");
  check(jobRoles.map((r) => r.metadata.namespace).sort().join(",") === "ml-team-a,ml-team-b" &&
        jobRoles.every((r) => norm(r.rules) === norm(want.rules)),
        "a Role in each watched namespace with deploy/operator.yaml's rules");
  check(args.includes("--namespace=ml-team-a") && args.includes("--namespace=ml-team-b"), "--namespace per watched namespace");
  check(pod.nodeSelector?.["kubernetes.io/os"] === "linux" && pod.tolerations?.length === 1 && pod.affinity?.podAntiAffinity,
        "nodeSelector, tolerations, affinity");
  const sm = kinds("ServiceMonitor")[0];
  check(sm && sm.spec.endpoints[0].port === "metrics" && sm.spec.endpoints[0].honorLabels === true &&
        sm.metadata.labels.release === "kube-prometheus-stack",
        "ServiceMonitor: metrics port, honorLabels (keeps the job's namespace/job labels), selectable label");
  const pm = kinds("PodMonitor")[0];
  check(pm && pm.spec.podMetricsEndpoints.map((e) => e.port).sort().join(",") === "metrics,sidecar-metrics" &&
        pm.spec.jobLabel === "shardguard.io/job" && pm.spec.selector.matchLabels["app.kubernetes.io/managed-by"] === "shardguard-operator" &&
        pm.spec.podMetricsEndpoints.every((e) => e.relabelings.some((r) => r.targetLabel === "pod_uid")),
        "PodMonitor: shard pods' metrics and sidecar-metrics ports, job from shardguard.io/job, pod_uid");
  const pr = kinds("PrometheusRule")[0];
  if (check(pr, "PrometheusRule rendered")) {
    const file = YAML.parse(fs.readFileSync(path.join(repo, "charts/shardguard/files/alerts.yaml"), "utf8"));
    const strip = (groups) => groups.map((g) => ({ ...g, rules: g.rules.map((r) => {
      const { runbook_url, ...ann } = r.annotations;
      const { team, ...labels } = r.labels || {};
      return { ...r, annotations: ann, labels };
    }) }));
    check(canon(strip(pr.spec.groups)) === canon(strip(file.groups)),
          "PrometheusRule groups = files/alerts.yaml (but runbook_url and alertLabels)");
    const rules = pr.spec.groups.flatMap((g) => g.rules);
    check(rules.every((r) => r.annotations.runbook_url === `https://wiki.example.com/shardguard/alerts#${r.alert.toLowerCase()}` &&
                             r.labels.team === "ml-platform"),
          "runbook_url re-based on prometheusRule.runbookBaseUrl, alertLabels added");
  }
  const cms = kinds("ConfigMap");
  const dashFiles = fs.readdirSync(path.join(repo, "charts/shardguard/dashboards")).filter((f) => f.endsWith(".json"));
  check(cms.length === dashFiles.length && cms.every((m) => m.metadata.labels.grafana_dashboard === "1" &&
        m.metadata.namespace === "monitoring" && m.metadata.annotations?.grafana_folder === "ShardGuard"),
        `${dashFiles.length} dashboard ConfigMaps labelled grafana_dashboard: "1" in namespace monitoring`);
  for (const f of dashFiles) {
    const cm = cms.find((m) => Object.keys(m.data).includes(`shardguard-${f}`));
    check(cm && cm.data[`shardguard-${f}`] === fs.readFileSync(path.join(repo, "charts/shardguard/dashboards", f), "utf8").replace(/\n$/, ""),
          `ConfigMap carries dashboards/${f} unchanged`);
  }
}

// ---- dashboards -------------------------------------------------------------------
function dashboards(repo) {
  const dir = path.join(repo, "charts/shardguard/dashboards");
  return fs.readdirSync(dir).filter((f) => f.endsWith(".json")).sort().map((f) => ({ file: f, text: fs.readFileSync(path.join(dir, f), "utf8") }));
}
function allPanels(panels) {
  return (panels || []).flatMap((p) => [p, ...allPanels(p.panels)]);
}
// Grafana's variables → something PromQL parses.
function grafanaToPromql(expr) {
  return expr
    .replace(/\$__(rate_interval|interval|range)\b/g, "5m")
    .replace(/\$\{[A-Za-z_][A-Za-z0-9_]*(:[a-z]+)?\}/g, ".*")
    .replace(/\$[A-Za-z_][A-Za-z0-9_]*/g, ".*");
}
function cmdDashboards(repo, outRules) {
  const groups = [];
  const uids = new Set();
  for (const { file, text } of dashboards(repo)) {
    let d;
    try {
      d = JSON.parse(text);
    } catch (e) {
      fail(`${file}: not valid JSON (${e.message})`);
      continue;
    }
    ok(`${file}: valid JSON`);
    check(typeof d.uid === "string" && d.uid && !uids.has(d.uid), `${file}: uid ${d.uid} unique`);
    uids.add(d.uid);
    const panels = allPanels(d.panels);
    const ids = panels.map((p) => p.id);
    check(panels.length > 0 && ids.every(Number.isInteger) && new Set(ids).size === ids.length,
          `${file}: ${panels.length} panels, ids unique integers`);
    const vars = d.templating?.list || [];
    const v = (n) => vars.find((x) => x.name === n);
    check(v("datasource")?.type === "datasource" && v("datasource").query === "prometheus", `${file}: datasource variable (prometheus)`);
    for (const n of ["namespace", "job"]) {
      check(v(n)?.type === "query" && v(n).datasource?.uid === "${datasource}" && /label_values\(/.test(v(n).definition),
            `${file}: ${n} template variable (label_values on \${datasource})`);
    }
    const rules = [];
    for (const p of panels.filter((p) => p.type !== "row")) {
      const t = p.targets || [];
      if (!check(t.length > 0 && p.datasource?.uid === "${datasource}" && t.every((x) => x.datasource?.uid === "${datasource}"),
                 `${file}: panel ${p.id} "${p.title}" queries \${datasource}`)) continue;
      for (const x of t) {
        if (!/\$namespace/.test(x.expr) || !/\$job/.test(x.expr)) fail(`${file}: panel ${p.id} ${x.refId} does not filter on $namespace and $job`);
        rules.push({ record: `dashboard:${file.replace(/\.json$/, "").replace(/-/g, "_")}:panel${p.id}_${x.refId}`, expr: grafanaToPromql(x.expr) });
      }
    }
    for (const n of ["namespace", "job"]) {
      const q = v(n)?.query?.query || v(n)?.definition || "";
      const m = /^label_values\((.*),\s*[a-z_]+\)$/.exec(q);
      if (m) rules.push({ record: `dashboard:${file.replace(/\.json$/, "").replace(/-/g, "_")}:var_${n}`, expr: grafanaToPromql(m[1]) });
    }
    groups.push({ name: `dashboard-${file}`, rules });
  }
  fs.writeFileSync(outRules, YAML.stringify({ groups }));
  process.stdout.write(`${groups.reduce((n, g) => n + g.rules.length, 0)} dashboard expressions written to ${outRules} for promtool\n`);
}

// ---- metric names -----------------------------------------------------------------
const KEYWORDS = new Set(["and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan", "atan2"]);
export function metricNames(expr) {
  let e = grafanaToPromql(expr)
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ");
  const names = new Set();
  for (const m of e.matchAll(/(?<![0-9.A-Za-z_:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?/g)) {
    if (m[2]) continue; // a function call
    if (KEYWORDS.has(m[1].toLowerCase())) continue;
    names.add(m[1]);
  }
  return [...names];
}
function sourceMetricNames(repo) {
  const names = new Set();
  const walk = (dir) => {
    for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, ent.name);
      if (ent.isDirectory()) walk(p);
      else if (/\.(cpp|cc|h|hpp)$/.test(ent.name)) {
        for (const m of fs.readFileSync(p, "utf8").matchAll(/"((shardguard|controller_runtime|workqueue|leader_election)_[a-z0-9_]+)"/g))
          names.add(m[1]);
      }
    }
  };
  for (const d of ["operator", "shardd", "sidecar", "common"]) if (fs.existsSync(path.join(repo, d))) walk(path.join(repo, d));
  return names;
}
// Series Prometheus makes itself for every target; not exported by any process.
const PROMETHEUS_SERIES = { up: "Prometheus' own per-target health series (ShardPodCrashLooping counts shard pod incarnations with it)" };
// Every PromQL expression of the dashboards (panels, and the query behind each
// label_values variable) and of the alert rules, with where it comes from.
function expressions(repo) {
  const uses = [];
  for (const { file, text } of dashboards(repo)) {
    const d = JSON.parse(text);
    for (const p of allPanels(d.panels)) for (const t of p.targets || []) uses.push({ where: `${file} panel ${p.id} ${t.refId} "${p.title}"`, expr: t.expr });
    for (const v of d.templating?.list || []) if (v.type === "query") uses.push({ where: `${file} variable ${v.name}`, expr: (v.definition || "").replace(/^label_values\((.*),\s*[a-z_]+\)$/, "$1") });
  }
  const alerts = YAML.parse(fs.readFileSync(path.join(repo, "charts/shardguard/files/alerts.yaml"), "utf8"));
  for (const g of alerts.groups) for (const r of g.rules) uses.push({ where: `alerts.yaml ${r.alert || r.record}`, expr: r.expr, alert: r.alert });
  return uses;
}
// For the monitoring end-to-end test (tests/integration/monitoring_e2e_test.cpp): every
// expression as Prometheus can run it (Grafana variables: $namespace/$job match all,
// intervals 5m) with the metric names it reads.
function cmdQueries(repo, out) {
  const q = expressions(repo).map((u) => ({ where: u.where, expr: grafanaToPromql(u.expr), metrics: metricNames(u.expr), alert: u.alert || "" }));
  fs.writeFileSync(out, JSON.stringify(q, null, 1));
  process.stdout.write(`${q.length} expressions written to ${out}\n`);
}
function cmdMetrics(repo) {
  const known = sourceMetricNames(repo);
  process.stdout.write(`${known.size} metric names registered in operator/, shardd/, sidecar/, common/ (string literals; ` +
    `the live check against real /metrics pages is tests/integration/monitoring_e2e_test.cpp)\n`);
  const uses = expressions(repo);
  const seen = new Set();
  for (const u of uses) {
    const names = metricNames(u.expr);
    if (!names.length) fail(`${u.where}: no metric found in ${JSON.stringify(u.expr)}`);
    for (const n of names) {
      const base = n.replace(/_(bucket|sum|count)$/, "");
      if (known.has(n) || (base !== n && known.has(base))) {
        seen.add(base);
        continue;
      }
      if (PROMETHEUS_SERIES[n]) {
        if (!seen.has(n)) process.stdout.write(`note ${n}: ${PROMETHEUS_SERIES[n]}\n`);
        seen.add(n);
        continue;
      }
      fail(`${u.where}: metric ${n} is not registered anywhere in the sources`);
    }
  }
  check(failures === 0, `${uses.length} expressions name ${seen.size} metrics, all exported by the project or made by Prometheus`);
}

const [cmd, ...rest] = process.argv.slice(2);
if (cmd === "split" && rest.length === 2) cmdSplit(...rest);
else if (cmd === "objects" && rest.length === 3 && ["default", "full"].includes(rest[0])) cmdObjects(...rest);
else if (cmd === "rbac" && (rest.length === 1 || (rest.length === 2 && rest[1] === "users"))) cmdRbac(...rest);
else if (cmd === "dashboards" && rest.length === 2) cmdDashboards(...rest);
else if (cmd === "metrics" && rest.length === 1) cmdMetrics(...rest);
else if (cmd === "queries" && rest.length === 2) cmdQueries(...rest);
else die("usage: check_chart.mjs split RENDERED OUT | rbac FILE [users] | objects default|full RENDERED REPO | dashboards REPO OUT_RULES | metrics REPO | queries REPO OUT");
process.stdout.write(failures ? `${failures} check(s) failed\n` : "all checks passed\n");
process.exit(failures ? 1 : 0);
