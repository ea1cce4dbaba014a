"""The queue API's server side: durable requests, the workers that run them, webhooks."""
