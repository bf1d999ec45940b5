/**
 * Compile-time tests of defineConfig() (the `dovetail` config file). Type-checked by the
 * build; every `@ts-expect-error` line MUST fail to compile. It is not run.
 */
import { defineConfig, defineMilter, lmtp, type DovetailConfig } from '../../lib/index.js';
import { sizeLimit } from '../../milters/index.js';

// Every form a config may take compiles: declarative milters and routes, objects, functions.
export const good: DovetailConfig = defineConfig({
  hostname: 'mx.example.com',
  listen: [{ host: '0.0.0.0', port: 25, name: 'mx', auth: false }, { port: 587, submission: true, milters: [{ use: 'senderLogin', file: './sender-login' }] }],
  tls: { key: './key.pem', cert: './cert.pem' },
  limits: { maxMessageBytes: 1 << 20, clientLimits: false, errorLimits: { soft: 5 } },
  milters: [
    { use: 'sizeLimit', maxBytes: 1000 },
    { use: 'relayControl', localDomains: ['example.com'] },
    { connect: 'inet:127.0.0.1:11332', defaultAction: 'accept' },
    { module: './m.ts', options: { tag: 'x' } },
    sizeLimit({ maxBytes: 10 }),
    defineMilter({ name: 'inline' }),
  ],
  delivery: {
    store: { root: './var/mail', domains: ['example.com'] },
    routes: { 'example.com': { store: true }, '.example.org': { lmtp: '127.0.0.1:24' }, 'x.test': lmtp({ host: '127.0.0.1', port: 24 }), '*': { smtp: { relayhost: '[smtp.example.net]:587', tls: 'encrypt' } } },
  },
  authenticate: { dovecot: '/run/dovecot/auth-client' },
  log: { level: 'debug' },
  metrics: { listen: '127.0.0.1:9464' },
});

export const asFunction = defineConfig(async () => ({ delivery: { maildir: '/srv/mail' } }));
export const withAuthFunction = defineConfig({ delivery: { maildir: '/srv/mail' }, authenticate: async (r) => r.username === 'a' });

// @ts-expect-error delivery is required
export const noDelivery = defineConfig({ hostname: 'x' });
// @ts-expect-error a port is a number
export const badPort = defineConfig({ listen: [{ port: '25' }], delivery: { maildir: '/x' } });
// @ts-expect-error no such bundled milter
export const badUse = defineConfig({ milters: [{ use: 'antivirus' }], delivery: { maildir: '/x' } });
// @ts-expect-error sizeLimit needs maxBytes as a number
export const badOption = defineConfig({ milters: [{ use: 'sizeLimit', maxBytes: 'big' }], delivery: { maildir: '/x' } });
// @ts-expect-error log levels are pino's
export const badLevel = defineConfig({ log: { level: 'loud' }, delivery: { maildir: '/x' } });
// @ts-expect-error listener tls is one of three words
export const badTls = defineConfig({ listen: [{ port: 25, tls: true }], delivery: { maildir: '/x' } });
