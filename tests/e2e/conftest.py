"""The e2e tests use the VM harness of tests/vm (fixtures and the serial-console report)."""

from tests.vm.conftest import (  # noqa: F401  (fixtures and a hook, shared)
    etcd,
    installed_disks,
    lifecycle_images,
    node_image,
    pytest_runtest_makereport,
)

