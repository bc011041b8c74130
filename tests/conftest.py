"""Shared test configuration.

The Kafka and Pub/Sub fixtures (``kafka_backend``, ``kafka_topic_factory``, ``kafka_group_id``,
``pubsub_backend``, ``pubsub_factory``, ``pubsub_env``) come from the package's own pytest
plugin, ``pubsub_canary.testing.plugin``, loaded through its entry point.
"""

# pytester runs inner pytest sessions: the plugin's skip/fail behaviour is tested that way.
pytest_plugins = ["pytester"]
