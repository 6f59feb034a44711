// Package caddymodule is etcaddy's Caddy glue: the raftkv app that runs a
// member, the etcd handler that serves etcd's v2 HTTP API beside any other
// route of a site, their Caddyfile syntax, and the operator routes on
// Caddy's admin API (status, members, leader transfer, backups).
//
// It owns request parsing and response writing, byte for byte as etcd 3.4
// answers, etcd's v2 auth (users, roles, access checks, bcrypt: auth.go),
// and the member's lifetime across config reloads (the Raft node lives in a
// package-level UsagePool, never in an app instance). It holds no keyspace
// logic: every read and write, the auth data's too, goes to package raftkv.
package caddymodule
