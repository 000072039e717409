# Local control plane targets (qjob_dev.localcluster, with build.sh and its data in hack/localcluster).
# Included from the top-level Makefile.
#   make cluster-binaries   build etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
#                           kubectl, kwok and helm into ~/.cache/qjob-operator/bin/<version>-<hash>
#                           (once; ~25 min cold on 2 cores). QJOB_K8S_BIN_DIR=<dir> uses existing ones.
#   make cluster-up         start (or reuse) the cluster in $(CLUSTER_DIR); kubeconfig in
#                           $(CLUSTER_DIR)/kubeconfig
#   make cluster-status     processes, ports, memory, nodes
#   make cluster-down       stop every process and remove $(CLUSTER_DIR)
# The harness needs only python3 with PyYAML (system python3 has it; override CLUSTER_PYTHON).
CLUSTER_DIR ?= .cluster
CLUSTER_PYTHON ?= python3
LOCALCLUSTER = PYTHONPATH=hack $(CLUSTER_PYTHON) -m qjob_dev.localcluster

.PHONY: cluster-binaries cluster-up cluster-down cluster-status

cluster-binaries:
	@hack/localcluster/build.sh

cluster-up:
	@$(LOCALCLUSTER) up --dir $(CLUSTER_DIR)

cluster-down:
	@$(LOCALCLUSTER) down --dir $(CLUSTER_DIR)

cluster-status:
	@$(LOCALCLUSTER) status --dir $(CLUSTER_DIR)
