"""The emulated guest (agent, vCPU, workload, self-check, layout, page content) and its host side: the hypercall channel, the VM state, the guest's host resources."""
