-- Row-level security for postgres_changes: which of a batch of row versions each subscriber's
-- role, with its JWT claims, may SELECT. The versions are the ones in the change, not the table's
-- current rows: each is rebuilt from its column text, and the table's SELECT policies that apply
-- to the role (permissive ones OR'd, restrictive ones AND'd, as Postgres combines them) are
-- evaluated on it as that role with the claims set, so functions such as auth.uid() and
-- subqueries into other tables behave as in a query by that role.
--
-- Arguments, one element per claims set: `roles`, `claims`, and `wanted` (an int[] literal of the
-- 1-based positions in `rows` to check for it). `rows` is a JSON array of objects mapping column
-- names to their text (or null); a column that is absent is NULL. An error for one claims set (a
-- policy that raises, an unknown role) is reported in its row and does not affect the others.
--
-- One result row per claims set k (1-based, in input order):
--   access  'none'  the role may SELECT no column of the table
--           'open'  row-level security does not apply to the role (disabled, BYPASSRLS, owner)
--           'rls'   `visible` lists the wanted positions whose row version it may see
--           'error' `error` says why: deny
--   hidden  columns the role may not SELECT (column grants)
-- Nothing here writes. Callers sort claims sets by role: policies are looked up once per role.

CREATE OR REPLACE FUNCTION walcast.rls_check(
    rel regclass, roles text[], claims jsonb[], wanted text[], rows jsonb
)
    RETURNS TABLE (k int, access text, hidden text[], visible int[], error text)
    LANGUAGE plpgsql
    SET search_path = ''
    AS $fn$
DECLARE
    alias text;
    projection text;
    role_name text;
    prepared_for text;
    role_access text;
    role_hidden text[];
    permissive text;
    restrictive text;
    caller_role text := pg_catalog.current_setting('role');
BEGIN
    SELECT pg_catalog.quote_ident(c.relname) INTO alias FROM pg_catalog.pg_class c WHERE c.oid = rel;
    SELECT pg_catalog.string_agg(
               pg_catalog.format('(r.j ->> %L)::%s AS %I', a.attname,
                                 pg_catalog.format_type(a.atttypid, a.atttypmod), a.attname),
               ', ' ORDER BY a.attnum)
      INTO projection
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
    FOR i IN 1 .. coalesce(pg_catalog.array_length(roles, 1), 0) LOOP
        k := i;
        error := NULL;
        role_name := roles[i];
        BEGIN
            IF prepared_for IS DISTINCT FROM role_name THEN
                -- PREPARE is not transactional: one left by a failed claims set may remain.
                IF EXISTS (SELECT FROM pg_catalog.pg_prepared_statements s WHERE s.name = 'walcast_rls') THEN
                    DEALLOCATE walcast_rls;
                END IF;
                prepared_for := NULL;
                PERFORM pg_catalog.set_config('role', role_name, true);
                IF NOT pg_catalog.has_any_column_privilege(rel, 'SELECT') THEN
                    role_access := 'none';
                    role_hidden := NULL;
                ELSE
                    SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
                      INTO role_hidden
                      FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                       AND NOT pg_catalog.has_column_privilege(rel, a.attnum, 'SELECT');
                    role_access := CASE WHEN pg_catalog.row_security_active(rel) THEN 'rls' ELSE 'open' END;
                END IF;
                permissive := NULL;
                restrictive := NULL;
                IF role_access = 'rls' THEN
                    SELECT pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' OR ')
                               FILTER (WHERE p.polpermissive),
                           pg_catalog.string_agg('(' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')', ' AND ')
                               FILTER (WHERE NOT p.polpermissive)
                      INTO permissive, restrictive
                      FROM pg_catalog.pg_policy p
                     WHERE p.polrelid = rel AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
                       AND EXISTS (SELECT FROM pg_catalog.unnest(p.polroles) AS pr(id)
                                    WHERE pr.id = 0 OR pg_catalog.pg_has_role(role_name, pr.id, 'USAGE'));
                    IF permissive IS NOT NULL THEN
                        EXECUTE pg_catalog.format(
                            'PREPARE walcast_rls(jsonb, int[]) AS '
                            'SELECT coalesce(pg_catalog.array_agg(r.n::int ORDER BY r.n), ''{}'') '
                            'FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS r(j, n) '
                            'WHERE r.n = ANY ($2) AND EXISTS (SELECT FROM (SELECT %s) AS %s WHERE (%s)%s)',
                            projection, alias, permissive, coalesce(' AND ' || restrictive, ''));
                    END IF;
                END IF;
                prepared_for := role_name;
            END IF;
            access := role_access;
            hidden := role_hidden;
            visible := NULL;
            IF role_access = 'rls' THEN
                visible := '{}';
                IF permissive IS NOT NULL AND wanted[i] <> '{}' THEN
                    PERFORM pg_catalog.set_config('role', role_name, true);
                    PERFORM pg_catalog.set_config('request.jwt.claims', claims[i]::text, true);
                    PERFORM pg_catalog.set_config('request.jwt.claim.sub', coalesce(claims[i] ->> 'sub', ''), true);
                    PERFORM pg_catalog.set_config('request.jwt.claim.role', coalesce(claims[i] ->> 'role', ''), true);
                    EXECUTE pg_catalog.format('EXECUTE walcast_rls(%L, %L)', rows, wanted[i]) INTO visible;
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            access := 'error';
            hidden := NULL;
            visible := NULL;
            error := SQLERRM;
            prepared_for := NULL;
        END;
        RETURN NEXT;
    END LOOP;
    IF EXISTS (SELECT FROM pg_catalog.pg_prepared_statements s WHERE s.name = 'walcast_rls') THEN
        DEALLOCATE walcast_rls;
    END IF;
    PERFORM pg_catalog.set_config('role', caller_role, true);
    PERFORM pg_catalog.set_config('request.jwt.claims', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.sub', '', true);
    PERFORM pg_catalog.set_config('request.jwt.claim.role', '', true);
END
$fn$;
