pytest_plugins = ["tests.conftest_data"]
