package caddymodule

import (
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("raftkv", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("etcd", parseEtcdDirective)
	// etcd goes after every directive that shapes or guards a request
	// (header, rewrite, uri, basic_auth, forward_auth, encode, ...) and
	// before the ones that answer it (respond, reverse_proxy,
	// php_fastcgi, file_server). It answers only the API's paths and
	// hands every other to the next handler, so `etcd`, `reverse_proxy
	// /app/*` and `file_server` share one site in that order; a catch-all
	// `respond` or `file_server` never hides /v2/keys.
	httpcaddyfile.RegisterDirectiveOrder("etcd", httpcaddyfile.Before, "respond")
}

// parseGlobalOption sets up the raftkv app from the global option of the
// same name. Given twice, the second block adds to the first's lists; an
// option of one value may be set in only one of them.
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	app := new(App)
	if prev, ok := existing.(httpcaddyfile.App); ok {
		if err := json.Unmarshal(prev.Value, app); err != nil {
			return nil, err
		}
		block := new(App)
		if err := block.UnmarshalCaddyfile(d); err != nil {
			return nil, err
		}
		if opt := setInBoth(app, block); opt != "" {
			return nil, d.Errf("raftkv option %s is set twice", opt)
		}
		d.Reset()
	}
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{
		Name:  "raftkv",
		Value: caddyconfig.JSON(app, nil),
	}, nil
}

// setInBoth returns the name of an option of one value (not a list) that
// both a and b set, or "".
func setInBoth(a, b *App) string {
	va, vb := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	for i := range va.NumField() {
		f := va.Type().Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		if k := f.Type.Kind(); k == reflect.Slice || k == reflect.Map {
			continue
		}
		if !va.Field(i).IsZero() && !vb.Field(i).IsZero() {
			return name
		}
	}
	return ""
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens. Syntax:
//
//	raftkv {
//		name                     <name>
//		data_dir                 <path>
//		snapshot_count           <entries>
//		snapshot_catchup_entries <entries>
//		heartbeat_interval       <duration>
//		election_timeout         <duration>
//		initial_cluster          <name>=<peer_url>...
//		initial_cluster_state    new|existing
//		initial_cluster_token    <token>
//		initial_advertise_peer_urls <peer_url>...
//		discovery                <url>
//		discovery_proxy          <proxy_url>
//		discovery_fallback       proxy|exit
//		proxy                    off|on|readonly
//		proxy_refresh_interval   <duration>
//		proxy_failure_wait       <duration>
//		proxy_dial_timeout       <duration>
//		proxy_read_timeout       <duration>|off
//		proxy_write_timeout      <duration>|off
//		discovery_srv            <domain>
//		discovery_srv_name       <name>
//		advertise_client_urls    <url>...
//		peer_cert_file           <cert.pem>
//		peer_key_file            <key.pem>
//		peer_trusted_ca_file     <ca.pem>
//		strict_reconfig_check    [true|false]
//		force_new_cluster        [true|false]
//	}
//
// initial_cluster takes etcd's --initial-cluster list, as one
// comma-separated argument or as several; a name given twice gets several
// peer URLs. The peer_* files are the client side of peer TLS: the
// certificate and key this member presents when it dials an https:// peer
// URL, and the CA it trusts there.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for d.Next() {
		if d.NextArg() {
			return d.ArgErr()
		}
		for d.NextBlock(0) {
			opt := d.Val()
			switch opt {
			case "initial_cluster", "advertise_client_urls", "initial_advertise_peer_urls":
				// Lists: each line adds to them.
			default:
				if seen[opt] {
					return d.Errf("raftkv option %s is set twice", opt)
				}
				seen[opt] = true
			}
			switch opt {
			case "name", "data_dir", "initial_cluster_state", "initial_cluster_token",
				"peer_cert_file", "peer_key_file", "peer_trusted_ca_file", "discovery", "discovery_proxy",
				"discovery_fallback", "discovery_srv", "discovery_srv_name", "proxy":
				var v string
				if !d.Args(&v) {
					return d.ArgErr()
				}
				if d.NextArg() {
					return d.ArgErr()
				}
				if v == "" {
					return d.Errf("%s needs a value, not an empty one", opt)
				}
				switch opt {
				case "name":
					a.Name = v
				case "data_dir":
					a.DataDir = v
				case "initial_cluster_state":
					if v != "new" && v != "existing" {
						return d.Errf(`initial_cluster_state must be "new" or "existing", not %q`, v)
					}
					a.InitialClusterState = v
				case "initial_cluster_token":
					a.InitialClusterToken = v
				case "peer_cert_file":
					a.PeerCertFile = v
				case "peer_key_file":
					a.PeerKeyFile = v
				case "peer_trusted_ca_file":
					a.PeerTrustedCAFile = v
				case "discovery":
					a.Discovery = v
				case "discovery_proxy":
					a.DiscoveryProxy = v
				case "discovery_fallback":
					if v != "proxy" && v != "exit" {
						return d.Errf(`discovery_fallback must be "proxy" or "exit", not %q`, v)
					}
					a.DiscoveryFallback = v
				case "proxy":
					if v != "off" && v != "on" && v != "readonly" {
						return d.Errf(`proxy must be "off", "on" or "readonly", not %q`, v)
					}
					a.Proxy = v
				case "discovery_srv":
					a.DiscoverySRV = v
				case "discovery_srv_name":
					a.DiscoverySRVName = v
				}

			case "snapshot_count", "snapshot_catchup_entries":
				var v string
				if !d.Args(&v) || d.NextArg() {
					return d.ArgErr()
				}
				n, err := strconv.ParseUint(v, 10, 64)
				if err != nil || n == 0 {
					return d.Errf("%s must be a positive number of entries, not %q", opt, v)
				}
				if n > maxEntryCount {
					return d.Errf("%s must be at most %d, not %s", opt, uint64(maxEntryCount), v)
				}
				if opt == "snapshot_count" {
					a.SnapshotCount = n
				} else {
					a.SnapshotCatchUpEntries = n
				}

			case "heartbeat_interval", "election_timeout",
				"proxy_refresh_interval", "proxy_failure_wait", "proxy_dial_timeout":
				dur, err := durationArg(d, opt, false)
				if err != nil {
					return err
				}
				switch opt {
				case "heartbeat_interval":
					a.HeartbeatInterval = caddy.Duration(dur)
				case "election_timeout":
					a.ElectionTimeout = caddy.Duration(dur)
				case "proxy_refresh_interval":
					a.ProxyRefreshInterval = caddy.Duration(dur)
				case "proxy_failure_wait":
					a.ProxyFailureWait = caddy.Duration(dur)
				case "proxy_dial_timeout":
					a.ProxyDialTimeout = caddy.Duration(dur)
				}

			case "proxy_read_timeout", "proxy_write_timeout":
				dur, err := durationArg(d, opt, true)
				if err != nil {
					return err
				}
				// Off is a negative duration in JSON (zero is the default);
				// none is the read timeout's default, so it stays out.
				if opt == "proxy_read_timeout" {
					a.ProxyReadTimeout = caddy.Duration(dur)
				} else {
					if dur == 0 {
						dur = -1
					}
					a.ProxyWriteTimeout = caddy.Duration(dur)
				}

			case "initial_cluster":
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.ArgErr()
				}
				if a.InitialCluster == nil {
					a.InitialCluster = make(map[string][]string)
				}
				for _, arg := range args {
					for pair := range strings.SplitSeq(arg, ",") {
						if pair == "" {
							continue
						}
						name, u, ok := strings.Cut(pair, "=")
						if !ok || name == "" || u == "" {
							return d.Errf("initial_cluster: %q is not <name>=<peer_url>", pair)
						}
						a.InitialCluster[name] = append(a.InitialCluster[name], u)
					}
				}
				if len(a.InitialCluster) == 0 {
					return d.Err("initial_cluster needs <name>=<peer_url> pairs, not empty ones")
				}

			case "strict_reconfig_check", "force_new_cluster":
				on := true
				if d.NextArg() {
					v, err := strconv.ParseBool(d.Val())
					if err != nil {
						return d.Errf("%s must be true or false, not %q", opt, d.Val())
					}
					on = v
				}
				if d.NextArg() {
					return d.ArgErr()
				}
				if opt == "strict_reconfig_check" {
					a.StrictReconfigCheck = &on
				} else {
					a.ForceNewCluster = on
				}

			case "advertise_client_urls", "initial_advertise_peer_urls":
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.ArgErr()
				}
				list := &a.AdvertiseClientURLs
				if opt == "initial_advertise_peer_urls" {
					list = &a.InitialAdvertisePeerURLs
				}
				for _, arg := range args {
					for u := range strings.SplitSeq(arg, ",") {
						if u != "" {
							*list = append(*list, u)
						}
					}
				}
				if len(*list) == 0 {
					return d.Errf("%s needs URLs, not empty ones", opt)
				}

			default:
				return d.Errf("unrecognized raftkv option %q", opt)
			}
		}
	}
	return nil
}

// parseEtcdDirective sets up the etcd handler. Syntax:
//
//	etcd [<matcher>] {
//		cors <origin>...
//		client_cert_allowed_hostname <host>
//		client_crl_file <crl.pem>
//	}
//
// cors lists the origins browsers may call the API from (etcd's --cors),
// as separate arguments or comma-separated; "*" (the default) allows all.
// client_cert_allowed_hostname and client_crl_file are etcd's flags of the
// same names for the client certificates the site's client_auth takes.
func parseEtcdDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens; see
// parseEtcdDirective for the syntax.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for d.Next() {
		if d.NextArg() {
			return d.ArgErr()
		}
		for d.NextBlock(0) {
			switch opt := d.Val(); opt {
			case "cors":
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.ArgErr()
				}
				for _, arg := range args {
					for o := range strings.SplitSeq(arg, ",") {
						if o == "" {
							continue
						}
						if err := checkOrigin(o); err != nil {
							return d.Errf("cors: %v", err)
						}
						h.CORS = append(h.CORS, o)
					}
				}
				if len(h.CORS) == 0 {
					return d.Err("cors needs origins, not empty ones")
				}
			case "client_cert_allowed_hostname", "client_crl_file":
				var v string
				if !d.Args(&v) || d.NextArg() {
					return d.ArgErr()
				}
				if opt == "client_crl_file" {
					h.ClientCRLFile = v
				} else {
					h.ClientCertAllowedHostname = v
				}
			default:
				return d.Errf("unrecognized etcd option %q", opt)
			}
		}
	}
	return nil
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)

// durationArg reads option opt's one argument, a duration with its unit.
// With off (the proxy's read and write timeouts), "off" and 0, as etcd's
// flags say it, are none (0), and a duration must be at least 1ms;
// otherwise it must be positive.
func durationArg(d *caddyfile.Dispenser, opt string, off bool) (time.Duration, error) {
	var v string
	if !d.Args(&v) || d.NextArg() {
		return 0, d.ArgErr()
	}
	if off && v == "off" {
		return 0, nil
	}
	dur, err := caddy.ParseDuration(v)
	ok := err == nil && dur > 0
	if off {
		ok = err == nil && (dur == 0 || dur >= time.Millisecond)
	}
	if ok {
		return dur, nil
	}
	what, plain, orOff := "a positive duration", "a positive duration", ""
	if off {
		what, plain, orOff = "a duration", "a duration of at least 1ms", ", or off"
	}
	if n, nerr := strconv.ParseFloat(v, 64); nerr == nil && (n > 0 || !off) {
		// etcd's flags count milliseconds; a duration here names its unit.
		return 0, d.Errf("%s must be %s with its unit (%sms for etcd's %s milliseconds)%s, not %q", opt, what, v, v, orOff, v)
	}
	return 0, d.Errf("%s must be %s%s, not %q", opt, plain, orOff, v)
}
