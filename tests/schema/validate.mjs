#!/usr/bin/env node
// Validates Kubernetes objects against the published Kubernetes JSON schemas
// (npm package kubernetes-models, installed into tools/ by `make deps`) and custom
// resources against the openAPIV3Schema of their CustomResourceDefinition.
//
//   node tests/schema/validate.mjs [--crd CRD.yaml]... [--quiet] FILE...
//
// FILE is YAML (one or more documents) or JSON (one object, an array of objects, a
// List with items, or JSON lines); "-" reads standard input. Lists and arrays are
// expanded into their items. Each object prints one line,
//   ok  Pod ns/name
//   FAIL Pod ns/name: spec.containers must be array
// then a summary "N passed, N failed". Exit 0 when every object passed, 1 when any
// failed (an unknown apiVersion/kind fails, naming it), 2 for a usage error, an
// unreadable or unparsable file, or missing tooling.
//
// How an object finds its schema:
//   apiVersion + kind of a CRD given by --crd (spec.group/versions[].name, spec.names.kind)
//       → that version's openAPIV3Schema, compiled with ajv the way the API server
//         reads it: defaults applied before validation, nullable, int-or-string,
//         Kubernetes formats (int32, int64, byte, quantity, date-time, ...), list-type
//         set = unique items; and, as `kubectl --validate=strict` does, a field the
//         schema does not declare is an error unless x-kubernetes-preserve-unknown-fields.
//         metadata is checked against the ObjectMeta schema. CEL rules
//         (x-kubernetes-validations) are NOT evaluated (no CEL engine in node).
//   anything else → module kubernetes-models/<apiVersion>/<Kind> (apiVersion "v1" is the
//         core group, "apps/v1", "coordination.k8s.io/v1", ...), whose class must carry
//         that apiVersion and kind; its validate() runs the schema compiled from the
//         Kubernetes OpenAPI document (Kubernetes 1.31 for kubernetes-models 4.5.1).
//         These schemas do not forbid unknown fields.
//   A CustomResourceDefinition is, besides its own schema, checked for an
//   openAPIV3Schema that compiles and defaults that satisfy their schemas.
//
// The script lives in tests/schema; the packages live in tools/node_modules (or in
// $SHARDGUARD_TOOLS_DIR/node_modules), resolved with createRequire, so it runs from
// any working directory without NODE_PATH.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const toolsDir = path.resolve(process.env.SHARDGUARD_TOOLS_DIR || path.join(repoRoot, "tools"));

function die(message, code = 2) {
  process.stderr.write(`validate.mjs: ${message}\n`);
  process.exit(code);
}

if (!fs.existsSync(path.join(toolsDir, "node_modules", "kubernetes-models"))) {
  die(`${path.join(toolsDir, "node_modules")} has no kubernetes-models; run \`make deps\` ` +
      `(npm ci in tools/) first`);
}
const toolsRequire = createRequire(path.join(toolsDir, "package.json"));
let YAML, Ajv, k8sFormats, validateObjectMeta;
try {
  YAML = toolsRequire("yaml");
  // ajv and the Kubernetes formats: the copies kubernetes-models itself validates with.
  const validatePkg = toolsRequire.resolve("@kubernetes-models/validate");
  const validateRequire = createRequire(validatePkg);
  k8sFormats = validateRequire(validatePkg).formats;
  Ajv = validateRequire("ajv").default;
  validateObjectMeta = toolsRequire(
    "@kubernetes-models/apimachinery/_schemas/IoK8sApimachineryPkgApisMetaV1ObjectMeta").validate;
} catch (e) {
  die(`cannot load the packages of ${toolsDir}/node_modules (${e.message}); run \`make deps\``);
}

// ---- command line -------------------------------------------------------------

const usage = "usage: node tests/schema/validate.mjs [--crd CRD.yaml]... [--quiet] FILE...";
const crdFiles = [];
const files = [];
let quiet = false;
{
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; ++i) {
    const a = args[i];
    if (a === "--crd") {
      if (i + 1 >= args.length) die(`--crd needs a file\n${usage}`);
      crdFiles.push(args[++i]);
    } else if (a.startsWith("--crd=")) {
      crdFiles.push(a.slice("--crd=".length));
    } else if (a === "--quiet" || a === "-q") {
      quiet = true;
    } else if (a === "--help" || a === "-h") {
      process.stdout.write(usage + "\n");
      process.exit(0);
    } else if (a.startsWith("-") && a !== "-") {
      die(`unknown option ${a}\n${usage}`);
    } else {
      files.push(a);
    }
  }
  if (files.length === 0) die(`no files to validate\n${usage}`);
}

// ---- reading files ------------------------------------------------------------

function readText(file) {
  try {
    return file === "-" ? fs.readFileSync(0, "utf8") : fs.readFileSync(file, "utf8");
  } catch (e) {
    die(`cannot read ${file}: ${e.message}`);
  }
}

// Every top-level value of a file: YAML documents, or a JSON value, or JSON lines.
function parseFile(file) {
  const text = readText(file);
  const trimmed = text.trimStart();
  if (file.endsWith(".json") || file.endsWith(".jsonl") || trimmed.startsWith("{") || trimmed.startsWith("[")) {
    try {
      return [JSON.parse(text)];
    } catch (whole) {
      const lines = text.split("\n");
      const values = [];
      for (let n = 0; n < lines.length; ++n) {
        if (lines[n].trim() === "") continue;
        try {
          values.push(JSON.parse(lines[n]));
        } catch (e) {
          if (values.length === 0) die(`${file}: not JSON: ${whole.message}`);
          die(`${file}:${n + 1}: not a JSON line: ${e.message}`);
        }
      }
      return values;
    }
  }
  // YAML 1.1, as kubectl reads manifests (sigs.k8s.io/yaml on go-yaml v2): yes/no/on/off
  // are booleans there, so an unquoted one is caught by a string-typed field here too.
  const docs = YAML.parseAllDocuments(text, { version: "1.1", uniqueKeys: true, merge: true });
  const values = [];
  for (const doc of docs) {
    if (doc.errors.length > 0) die(`${file}: invalid YAML: ${doc.errors[0].message}`);
    const value = doc.toJS({ maxAliasCount: 100 });
    if (value !== null && value !== undefined) values.push(value);
  }
  return values;
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

// Arrays and Lists (kind v1/List or any *List with items) become their items.
function expand(value, out) {
  if (Array.isArray(value)) {
    for (const v of value) expand(v, out);
  } else if (isObject(value) && typeof value.kind === "string" && value.kind.endsWith("List") &&
             Array.isArray(value.items)) {
    for (const v of value.items) expand(v, out);
  } else {
    out.push(value);
  }
  return out;
}

// ---- error formatting ---------------------------------------------------------

// JSON pointer of an ajv error → spec.containers[0].name, walking the data so that
// array indices and map keys that look like numbers are told apart.
function fieldPath(data, pointer) {
  if (!pointer) return "";
  let out = "";
  let cur = data;
  for (const raw of pointer.split("/").slice(1)) {
    const seg = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    if (Array.isArray(cur)) {
      out += `[${seg}]`;
    } else if (/^[A-Za-z_$][A-Za-z0-9_$-]*$/.test(seg)) {
      out += out === "" ? seg : `.${seg}`;
    } else {
      out += `[${JSON.stringify(seg)}]`;
    }
    cur = cur !== null && typeof cur === "object" ? cur[seg] : undefined;
  }
  return out;
}

function describeErrors(data, errors, prefix = "") {
  // anyOf/oneOf report each branch and then themselves; keep the summary error of a
  // combinator and drop its branches, which carry the same instance path.
  const combinators = new Set(errors.filter((e) => e.keyword === "anyOf" || e.keyword === "oneOf")
    .map((e) => e.instancePath));
  const kept = errors.filter((e) => e.keyword === "anyOf" || e.keyword === "oneOf" ||
                                    !combinators.has(e.instancePath));
  const seen = new Set();
  const parts = [];
  for (const e of kept) {
    let where = fieldPath(data, e.instancePath);
    let message = e.message || e.keyword;
    if (e.keyword === "additionalProperties") {
      const field = e.params.additionalProperty;
      where = where === "" ? field : `${where}.${field}`;
      message = "unknown field (not in the schema)";
    } else if (e.keyword === "anyOf" || e.keyword === "oneOf") {
      // Say what each branch wanted (int-or-string, quantity: "must be string | must be number").
      // (Precompiled validators report branch schemaPaths relative to the branch, so
      // branches are matched by instance path.)
      const wanted = [...new Set(errors.filter((b) => b.instancePath === e.instancePath &&
                                                      b.keyword !== "anyOf" && b.keyword !== "oneOf")
                                       .map((b) => b.message))];
      if (wanted.length > 0) message = `${message} (${wanted.join(" | ")})`;
    } else if (e.keyword === "enum" && e.params.allowedValues) {
      message = `must be one of ${e.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")}`;
    }
    const full = prefix + where;
    const line = full === "" ? message : `${full} ${message}`;
    if (!seen.has(line)) {
      seen.add(line);
      parts.push(line);
    }
  }
  const shown = parts.slice(0, 4).join("; ");
  return parts.length > 4 ? `${shown}; (+${parts.length - 4} more)` : shown;
}

// ---- CustomResourceDefinition schemas -------------------------------------------

const NUMBER_FORMATS = {
  int32: { type: "number", validate: (n) => Number.isInteger(n) && n >= -(2 ** 31) && n < 2 ** 31 },
  int64: { type: "number", validate: (n) => Number.isInteger(n) },
  float: { type: "number", validate: () => true },
  double: { type: "number", validate: () => true },
};

function newAjv() {
  const ajv = new Ajv({ allErrors: true, strict: false, useDefaults: true, validateFormats: true });
  for (const [name, format] of Object.entries(k8sFormats)) ajv.addFormat(name, format);
  for (const [name, format] of Object.entries(NUMBER_FORMATS)) ajv.addFormat(name, format);
  return ajv;
}
const ajv = newAjv();

// The API server ignores formats it does not know; so does this.
function registerUnknownFormats(schema) {
  walkSchema(schema, (node) => {
    if (typeof node.format === "string" && !ajv.formats[node.format]) ajv.addFormat(node.format, true);
  });
}

function walkSchema(node, visit) {
  if (!isObject(node)) return;
  visit(node);
  for (const key of ["properties", "patternProperties", "definitions"]) {
    if (isObject(node[key])) for (const v of Object.values(node[key])) walkSchema(v, visit);
  }
  for (const key of ["items", "additionalProperties", "not"]) {
    if (isObject(node[key])) walkSchema(node[key], visit);
  }
  if (Array.isArray(node.items)) for (const v of node.items) walkSchema(v, visit);
  for (const key of ["allOf", "anyOf", "oneOf"]) {
    if (Array.isArray(node[key])) for (const v of node[key]) walkSchema(v, visit);
  }
}

// A structural schema (Kubernetes dialect) → a plain JSON schema for ajv.
function toAjvSchema(node, { root = false, strictFields = true } = {}) {
  if (!isObject(node)) return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (key.startsWith("x-kubernetes-") || key === "nullable") continue;
    if (key === "properties" || key === "patternProperties") {
      out[key] = {};
      for (const [name, sub] of Object.entries(value)) {
        // metadata at the root is checked against ObjectMeta, not closed here.
        const isRootMetadata = root && key === "properties" && name === "metadata";
        out[key][name] = toAjvSchema(sub, { strictFields: strictFields && !isRootMetadata });
      }
    } else if (key === "items" || key === "additionalProperties" || key === "not") {
      out[key] = Array.isArray(value) ? value.map((v) => toAjvSchema(v, { strictFields }))
                                      : toAjvSchema(value, { strictFields });
    } else if (key === "allOf" || key === "anyOf" || key === "oneOf") {
      // Inside value validations (structural schemas): no types of their own, no defaults.
      out[key] = value.map((v) => toAjvSchema(v, { strictFields: false }));
    } else {
      out[key] = value;
    }
  }
  // OpenAPI 3.0 (draft 4) exclusive bounds are booleans next to minimum/maximum.
  for (const [exclusive, bound] of [["exclusiveMinimum", "minimum"], ["exclusiveMaximum", "maximum"]]) {
    if (typeof out[exclusive] !== "boolean") continue;
    if (out[exclusive] && typeof out[bound] === "number") {
      out[exclusive] = out[bound];
      delete out[bound];
    } else {
      delete out[exclusive];
    }
  }
  if (node.nullable === true && typeof out.type === "string") out.type = [out.type, "null"];
  if (node["x-kubernetes-int-or-string"] === true && out.type === undefined) {
    out.anyOf = [...(out.anyOf || []), { type: "integer" }, { type: "string" }];
  }
  if (node["x-kubernetes-list-type"] === "set") out.uniqueItems = true;
  if (root) {
    out.properties = { apiVersion: { type: "string" }, kind: { type: "string" },
                       metadata: { type: "object" }, ...(out.properties || {}) };
  }
  const preserve = node["x-kubernetes-preserve-unknown-fields"] === true ||
                   node["x-kubernetes-embedded-resource"] === true;
  if (strictFields && !preserve && isObject(out.properties) && out.additionalProperties === undefined) {
    out.additionalProperties = false;
  }
  return out;
}

// Every `default` must satisfy the schema it is the default of (the API server
// refuses such a CRD). Returns problems as "path: message".
function checkDefaults(schema, where, problems) {
  if (!isObject(schema)) return;
  if (schema.default !== undefined) {
    const { default: value, ...rest } = schema;
    try {
      const check = ajv.compile(toAjvSchema(rest));
      const copy = structuredClone(value);
      if (!check(copy)) problems.push(`${where}.default ${describeErrors(copy, check.errors)}`);
    } catch (e) {
      problems.push(`${where}: ${e.message}`);
    }
  }
  if (isObject(schema.properties)) {
    for (const [name, sub] of Object.entries(schema.properties)) {
      checkDefaults(sub, `${where}.properties.${name}`, problems);
    }
  }
  if (isObject(schema.items)) checkDefaults(schema.items, `${where}.items`, problems);
  if (isObject(schema.additionalProperties)) {
    checkDefaults(schema.additionalProperties, `${where}.additionalProperties`, problems);
  }
}

// group/version + kind → compiled validator, from every --crd file.
const customKinds = new Map();

function compileCrdVersion(crd, version) {
  const schema = version?.schema?.openAPIV3Schema ?? crd.spec?.validation?.openAPIV3Schema;
  if (!isObject(schema)) throw new Error(`version ${version?.name}: no schema.openAPIV3Schema`);
  registerUnknownFormats(schema);
  return ajv.compile(toAjvSchema(schema, { root: true }));
}

// Problems of a CRD beyond its own schema: every version's openAPIV3Schema compiles
// and its defaults are valid.
function crdProblems(crd) {
  const problems = [];
  const versions = Array.isArray(crd.spec?.versions) ? crd.spec.versions : [];
  for (const [i, version] of versions.entries()) {
    try {
      compileCrdVersion(crd, version);
    } catch (e) {
      problems.push(`spec.versions[${i}].schema.openAPIV3Schema: does not compile: ${e.message}`);
      continue;
    }
    checkDefaults(version.schema.openAPIV3Schema, `spec.versions[${i}].schema.openAPIV3Schema`, problems);
  }
  return problems;
}

for (const file of crdFiles) {
  const crds = expand(parseFile(file), []);
  if (crds.length === 0) die(`--crd ${file}: no objects`);
  for (const crd of crds) {
    if (!isObject(crd) || crd.kind !== "CustomResourceDefinition" ||
        !String(crd.apiVersion).startsWith("apiextensions.k8s.io/")) {
      die(`--crd ${file}: ${isObject(crd) ? `${crd.apiVersion} ${crd.kind}` : "a value"} ` +
          `is not a CustomResourceDefinition`);
    }
    const group = crd.spec?.group;
    const kind = crd.spec?.names?.kind;
    if (!group || !kind || !Array.isArray(crd.spec?.versions)) {
      die(`--crd ${file}: ${crd.metadata?.name}: needs spec.group, spec.names.kind and spec.versions`);
    }
    for (const version of crd.spec.versions) {
      if (version.served === false) continue;
      try {
        customKinds.set(`${group}/${version.name} ${kind}`,
                        { validate: compileCrdVersion(crd, version), crd: crd.metadata?.name, file });
      } catch (e) {
        die(`--crd ${file}: ${crd.metadata?.name} version ${version.name}: ${e.message}`);
      }
    }
  }
}

// ---- validation -----------------------------------------------------------------

const API_VERSION = /^(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?\/)?v[0-9]+(?:(?:alpha|beta)[0-9]+)?$/;
const KIND = /^[A-Z][A-Za-z0-9]*$/;
const builtinCache = new Map();

// The kubernetes-models class for apiVersion/kind, or null when there is none.
function builtinModel(apiVersion, kind) {
  const key = `${apiVersion} ${kind}`;
  if (builtinCache.has(key)) return builtinCache.get(key);
  let model = null;
  if (API_VERSION.test(apiVersion) && KIND.test(kind)) {
    try {
      const mod = toolsRequire(`kubernetes-models/${apiVersion}/${kind}`);
      const cls = mod[kind];
      if (typeof cls === "function" && cls.apiVersion === apiVersion && cls.kind === kind) model = cls;
    } catch (e) {
      if (e.code !== "MODULE_NOT_FOUND" && e.code !== "ERR_PACKAGE_PATH_NOT_EXPORTED") throw e;
    }
  }
  builtinCache.set(key, model);
  return model;
}

function label(obj) {
  const kind = isObject(obj) && typeof obj.kind === "string" ? obj.kind : "?";
  const md = isObject(obj) && isObject(obj.metadata) ? obj.metadata : {};
  const name = typeof md.name === "string" ? md.name
             : typeof md.generateName === "string" ? `${md.generateName}*` : "<no name>";
  return typeof md.namespace === "string" ? `${kind} ${md.namespace}/${name}` : `${kind} ${name}`;
}

// "" when valid, else the reason.
function validateObject(obj) {
  if (!isObject(obj)) return `not an object (${Array.isArray(obj) ? "array" : typeof obj})`;
  const { apiVersion, kind } = obj;
  if (typeof apiVersion !== "string" || apiVersion === "") return "apiVersion is missing";
  if (typeof kind !== "string" || kind === "") return "kind is missing";

  const custom = customKinds.get(`${apiVersion} ${kind}`);
  if (custom) {
    const copy = structuredClone(obj);  // ajv writes the defaults into what it checks
    const problems = [];
    if (!custom.validate(copy)) problems.push(describeErrors(copy, custom.validate.errors));
    if (isObject(obj.metadata) && !validateObjectMeta(obj.metadata)) {
      problems.push(describeErrors(obj.metadata, validateObjectMeta.errors, "metadata."));
    }
    if (!isObject(obj.metadata) || typeof obj.metadata.name !== "string" || obj.metadata.name === "") {
      problems.push("metadata.name is required");
    }
    return problems.join("; ");
  }

  const Model = builtinModel(apiVersion, kind);
  if (!Model) {
    const group = apiVersion.includes("/") ? apiVersion.split("/")[0] : "";
    const hint = group.includes(".") && !group.endsWith("k8s.io")
      ? " (a custom resource? pass its CRD with --crd)" : "";
    return `unknown kind: no schema for apiVersion ${apiVersion} kind ${kind}${hint}`;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    if (!Array.isArray(e.errors)) throw e;
    return describeErrors(obj, e.errors);
  }
  if (kind === "CustomResourceDefinition") return crdProblems(obj).join("; ");
  return "";
}

let passed = 0;
let failed = 0;
for (const file of files) {
  const objects = expand(parseFile(file), []);
  if (objects.length === 0) {
    process.stdout.write(`FAIL ${file}: no objects\n`);
    ++failed;
    continue;
  }
  for (const obj of objects) {
    const problem = validateObject(obj);
    if (problem === "") {
      ++passed;
      if (!quiet) process.stdout.write(`ok  ${label(obj)}\n`);
    } else {
      ++failed;
      process.stdout.write(`FAIL ${label(obj)}: ${problem}${files.length > 1 ? ` (${file})` : ""}\n`);
    }
  }
}
process.stdout.write(`${passed} passed, ${failed} failed\n`);
process.exit(failed > 0 ? 1 : 0);
