#!/usr/bin/env bash
# Tests of charts/shardguard (ctest label "chart"; tests/chart/CMakeLists.txt):
#
#   chart_test.sh NODE REPO WORKDIR CASE
#
#   lint        helm lint --strict, default values and tests/chart/values-full.yaml
#               (lint renders every template, NOTES.txt included)
#   render      helm template with the defaults, values-full.yaml and leader election
#               by flag; every object validates (tests/schema/validate.mjs, the
#               monitoring.coreos.com kinds structurally) and holds what the chart
#               promises (check_chart.mjs objects)
#   rbac        who may write a job's status: in the chart rendered for every namespace,
#               for watchNamespaces and with leader election, and in deploy/operator.yaml,
#               only the operator's roles grant create/update/patch/* on
#               shardedtrainingjobs/status (check_chart.mjs rbac); the -edit and -view
#               ClusterRoles for people exist and are aggregated; the check itself fails
#               on manifests that break each rule
#   schema      bad values are refused by values.schema.json (helm template fails)
#   crd         the chart's CRD is byte-identical to crds/
#   rules       promtool check rules (files/alerts.yaml and the rendered
#               PrometheusRule) and promtool test rules (tests/chart/alerts_test.yaml)
#   dashboards  valid JSON, unique panel ids, variables; every query parses (promtool)
#   metrics     every metric in dashboards and rules is registered in the sources
#
# helm (tools/bin/helm), node with tools/node_modules and promtool come from
# `make deps`; without them a case fails and says so, it never skips.
set -euo pipefail

NODE=${1:?usage: chart_test.sh NODE REPO WORKDIR CASE}
REPO=${2:?}
WORK=${3:?}
CASE=${4:?}
CHART=$REPO/charts/shardguard
HERE=$REPO/tests/chart
HELM=$REPO/tools/bin/helm
mkdir -p "$WORK"

need() {
  case $1 in
    helm) [[ -x $HELM ]] || { echo "FAIL: $HELM missing; run make deps" >&2; exit 1; } ;;
    node) { [[ -n $NODE && $NODE != *NOTFOUND* ]] && command -v "$NODE" >/dev/null; } ||
            { echo "FAIL: node not found; run make deps" >&2; exit 1; }
          [[ -d $REPO/tools/node_modules/kubernetes-models ]] ||
            { echo "FAIL: $REPO/tools/node_modules missing; run make deps" >&2; exit 1; } ;;
    promtool) command -v promtool >/dev/null ||
            { echo "FAIL: promtool not found (Debian package prometheus); run make deps" >&2; exit 1; } ;;
  esac
}

template() { # OUT ARGS...: helm template of the chart, CRDs included
  local out=$1; shift
  "$HELM" template sg "$CHART" --namespace shardguard-system --include-crds "$@" > "$out"
}

validate() { # RENDERED: split off the monitoring kinds, validate the rest
  local in=$1
  "$NODE" "$HERE/check_chart.mjs" split "$in" "${in%.yaml}.k8s.yaml"
  "$NODE" "$REPO/tests/schema/validate.mjs" "${in%.yaml}.k8s.yaml"
}

case $CASE in
  lint)
    need helm
    "$HELM" lint --strict "$CHART"
    "$HELM" lint --strict "$CHART" -f "$HERE/values-full.yaml"
    ;;

  render)
    need helm; need node
    template "$WORK/default.yaml"
    validate "$WORK/default.yaml"
    "$NODE" "$HERE/check_chart.mjs" objects default "$WORK/default.yaml" "$REPO"
    template "$WORK/full.yaml" -f "$HERE/values-full.yaml"
    validate "$WORK/full.yaml"
    "$NODE" "$HERE/check_chart.mjs" objects full "$WORK/full.yaml" "$REPO"
    # One replica with leaderElection.enabled: leader election and its Lease Role.
    template "$WORK/leader.yaml" --set leaderElection.enabled=true
    validate "$WORK/leader.yaml"
    grep -qx -- '            - --leader-elect' "$WORK/leader.yaml" ||
      { echo "FAIL: leaderElection.enabled=true without --leader-elect" >&2; exit 1; }
    grep -q 'name: sg-shardguard-leader-election' "$WORK/leader.yaml" ||
      { echo "FAIL: leaderElection.enabled=true without the Lease Role" >&2; exit 1; }
    echo "ok   leaderElection.enabled=true with 1 replica: --leader-elect and the Lease Role"
    ;;

  rbac)
    need helm; need node
    template "$WORK/all-namespaces.yaml"
    template "$WORK/watch-namespaces.yaml" -f "$HERE/values-full.yaml"
    template "$WORK/leader.yaml" --set leaderElection.enabled=true
    template "$WORK/no-user-roles.yaml" --set rbac.userRoles=false
    for f in all-namespaces watch-namespaces leader; do
      "$NODE" "$HERE/check_chart.mjs" rbac "$WORK/$f.yaml" users
    done
    "$NODE" "$HERE/check_chart.mjs" rbac "$WORK/no-user-roles.yaml"
    if grep -q 'aggregate-to-' "$WORK/no-user-roles.yaml"; then
      echo "FAIL: rbac.userRoles=false still renders aggregated ClusterRoles" >&2; exit 1
    fi
    "$NODE" "$HERE/check_chart.mjs" rbac "$REPO/deploy/operator.yaml" users
    # The check must fail where a rule is broken: status writes for people (by a verb,
    # by "*", by "*/status"), the operator without update on status, the operator's
    # role aggregated into user roles.
    broken() { # NAME SED-SCRIPT: deploy/operator.yaml edited; the check must refuse it
      sed -e "$2" "$REPO/deploy/operator.yaml" > "$WORK/broken-$1.yaml"
      cmp -s "$REPO/deploy/operator.yaml" "$WORK/broken-$1.yaml" &&
        { echo "FAIL: broken case $1 changed nothing (update the sed script)" >&2; exit 1; }
      local rc=0
      "$NODE" "$HERE/check_chart.mjs" rbac "$WORK/broken-$1.yaml" users > "$WORK/broken-$1.out" 2>&1 || rc=$?
      # 1 = a check failed (2 would be a usage or parse error: not the refusal we want).
      if [[ $rc != 1 ]]; then
        cat "$WORK/broken-$1.out" >&2; echo "FAIL: check_chart.mjs rbac gave $rc for broken case $1, want 1" >&2; exit 1
      fi
      echo "ok   broken case $1 refused: $(grep -m1 '^FAIL' "$WORK/broken-$1.out")"
    }
    broken edit-patches-status '/name: shardguard-edit/,/^---/{/resources: \["shardedtrainingjobs\/status"\]/{n;s/"watch"\]/"watch", "patch"]/}}'
    broken view-star-verbs '/name: shardguard-view/,/^---/s/verbs: \["get", "list", "watch"\]/verbs: ["*"]/'
    broken edit-star-status '/name: shardguard-edit/,/^---/s/resources: \["shardedtrainingjobs"\]/resources: ["shardedtrainingjobs", "*\/status"]/'
    broken operator-no-status '/resources: \["shardedtrainingjobs\/status"\]/{n;s/verbs: \["update"\]/verbs: ["get"]/}'
    broken operator-aggregated '0,/^rules:/s/^    app.kubernetes.io\/part-of: shardguard$/&\n    rbac.authorization.k8s.io\/aggregate-to-edit: "true"/'
    ;;

  schema)
    need helm
    template "$WORK/schema-ok.yaml"
    bad=(
      "workers=0"
      "replicas=two"
      "operator.image.pullPolicy=Sometimes"
      "operator.image.repository=Not A Repo"
      "containerSecurityContext.privileged=true"
      "podSecurityContext.runAsNonRoot=false"
      "watchNamespaces[0]=Team_A"
      "logLevel=verbose"
      "serviceMonitor.interval=soon"
      "metrics.port=70000"
      "prometheusRule.runbookBaseUrl=wiki/alerts"
      "noSuchKey=1"
    )
    for set in "${bad[@]}"; do
      if out=$("$HELM" template sg "$CHART" --set "$set" 2>&1 >/dev/null); then
        echo "FAIL: --set $set was accepted" >&2; exit 1
      fi
      grep -q "values don't meet the specifications of the schema" <<<"$out" ||
        { echo "FAIL: --set $set refused, but not by values.schema.json: $out" >&2; exit 1; }
      echo "ok   --set $set refused by values.schema.json"
    done
    # A template-level refusal: a ServiceMonitor without the Service it scrapes.
    if "$HELM" template sg "$CHART" --set serviceMonitor.enabled=true --set metrics.service.enabled=false >/dev/null 2>&1; then
      echo "FAIL: serviceMonitor without metrics.service accepted" >&2; exit 1
    fi
    echo "ok   serviceMonitor.enabled without metrics.service.enabled refused"
    ;;

  crd)
    n=0
    for f in "$REPO"/crds/*.yaml; do
      cmp "$f" "$CHART/crds/$(basename "$f")" ||
        { echo "FAIL: $CHART/crds/$(basename "$f") differs from crds/; cp crds/*.yaml charts/shardguard/crds/" >&2; exit 1; }
      n=$((n + 1))
    done
    extra=$(comm -13 <(cd "$REPO/crds" && ls) <(cd "$CHART/crds" && ls))
    [[ -z $extra ]] || { echo "FAIL: only in the chart's crds/: $extra" >&2; exit 1; }
    echo "ok   $n CRD file(s) byte-identical to crds/"
    ;;

  rules)
    need helm; need node; need promtool
    promtool check rules "$CHART/files/alerts.yaml"
    # The rendered PrometheusRule's groups, as promtool reads them.
    "$HELM" template sg "$CHART" -f "$HERE/values-full.yaml" --show-only templates/prometheusrule.yaml > "$WORK/prometheusrule.yaml"
    "$NODE" -e '
      const { createRequire } = require("node:module");
      const YAML = createRequire(process.argv[1] + "/package.json")("yaml");
      const fs = require("node:fs");
      const o = YAML.parse(fs.readFileSync(process.argv[2], "utf8"));
      fs.writeFileSync(process.argv[3], YAML.stringify({ groups: o.spec.groups }));
    ' "$REPO/tools" "$WORK/prometheusrule.yaml" "$WORK/prometheusrule.rules.yaml"
    promtool check rules "$WORK/prometheusrule.rules.yaml"
    promtool test rules "$HERE/alerts_test.yaml"
    # Every alert has a unit test and a runbook section.
    for a in $(grep -oP '^\s+- alert: \K\w+' "$CHART/files/alerts.yaml"); do
      grep -q "alertname: $a\$" "$HERE/alerts_test.yaml" || { echo "FAIL: no promtool test for $a" >&2; exit 1; }
      grep -qi "^## $a\$" "$REPO/docs/alerts.md" || { echo "FAIL: docs/alerts.md has no section ## $a" >&2; exit 1; }
      echo "ok   $a: unit-tested, runbook in docs/alerts.md"
    done
    ;;

  dashboards)
    need node; need promtool
    "$NODE" "$HERE/check_chart.mjs" dashboards "$REPO" "$WORK/dashboard-queries.yaml"
    promtool check rules "$WORK/dashboard-queries.yaml"
    ;;

  metrics)
    need node
    "$NODE" "$HERE/check_chart.mjs" metrics "$REPO"
    ;;

  *) echo "chart_test.sh: unknown case $CASE" >&2; exit 2 ;;
esac
